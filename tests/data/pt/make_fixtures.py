#!/usr/bin/env python3
"""make_fixtures.py -- small .pt files shaped like torch.save output, made without torch.

Why this exists: the .pt reader (engine/ptfile.c) must be tested against what torch really
writes, but the build machines have no torch.  torch.save is CPython's own pickle module (protocol
2 by default) with a persistent_id hook that turns each storage into
('storage', torch.<Type>Storage, key, location, numel), zipped by caffe2's PyTorchStreamWriter.
So this script registers stand-in objects under the real names (torch._utils._rebuild_tensor_v2,
torch._utils._rebuild_parameter, torch.FloatStorage, ...) and lets the real pickle module emit
the opcodes; only the zip layout is re-created by hand: records in torch's order (data.pkl,
.format_version, .storage_alignment, byteorder, data/<key>..., version, .data/serialization_id),
each padded through an 'FB' local extra field so its data starts on a 64-byte boundary.

The values are small and fixed; tests/unit/test_ptfile.c asserts them exactly.  Output is
deterministic (fixed zip timestamps), so re-running it must leave `git diff` empty.

Usage: python3 tests/data/pt/make_fixtures.py
  writes tests/data/pt/*.pt and the fuzz seeds under tests/fuzz/seeds/fuzz_ptfile/ (copies of the
  small fixtures) and tests/fuzz/seeds/fuzz_pickle/ (their data.pkl records).
"""
import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", "..", ".."))
SEEDS_PT = os.path.join(ROOT, "tests", "fuzz", "seeds", "fuzz_ptfile")
SEEDS_PKL = os.path.join(ROOT, "tests", "fuzz", "seeds", "fuzz_pickle")

# ---------------------------------------------------------------------------------------------
# Stand-ins registered under torch's names, so pickle's save_global writes exactly
# "ctorch._utils\n_rebuild_tensor_v2\n" etc. and verifies the lookup round-trips.

torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")
torch._utils = torch_utils
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
    raise RuntimeError("stand-in: never called while writing fixtures")


def _rebuild_parameter(data, requires_grad, backward_hooks):
    raise RuntimeError("stand-in: never called while writing fixtures")


for fn in (_rebuild_tensor_v2, _rebuild_parameter):
    fn.__module__ = "torch._utils"
    setattr(torch_utils, fn.__name__, fn)

# storage class name -> struct format of one element
STORAGE_FMT = {
    "FloatStorage": "f", "HalfStorage": "e", "BFloat16Storage": "H", "DoubleStorage": "d",
    "LongStorage": "q", "IntStorage": "i", "ShortStorage": "h", "CharStorage": "b",
    "ByteStorage": "B", "BoolStorage": "?",
}
STORAGE_CLS = {}
for _name in STORAGE_FMT:
    _cls = type(_name, (), {"__module__": "torch", "__qualname__": _name})
    setattr(torch, _name, _cls)
    STORAGE_CLS[_name] = _cls


class Storage:
    """One storage: raw little-endian bytes of `numel` elements."""

    def __init__(self, cls_name, values, numel=None):
        fmt = STORAGE_FMT[cls_name]
        self.cls = STORAGE_CLS[cls_name]
        self.data = struct.pack("<%d%s" % (len(values), fmt), *values)
        self.numel = len(values) if numel is None else numel


class Tensor:
    """Pickles like torch.Tensor.__reduce_ex__ (torch/_tensor.py _reduce_ex_internal)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, offset
        self.size, self.stride = tuple(size), tuple(stride)

    def __reduce_ex__(self, proto):
        return (_rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False,
                                     collections.OrderedDict()))


class Parameter:
    """Pickles like torch.nn.Parameter.__reduce_ex__ (no hooks, no state)."""

    def __init__(self, data):
        self.data = data

    def __reduce_ex__(self, proto):
        return (_rebuild_parameter, (self.data, False, collections.OrderedDict()))


def contiguous(size):
    """torch's contiguous strides (a 0 size counts as 1)."""
    stride, acc = [], 1
    for s in reversed(size):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def tensor(cls_name, values, size):
    return Tensor(Storage(cls_name, values), 0, size, contiguous(size))


class TorchPickler(pickle.Pickler):
    """torch.save's persistent_id (torch/serialization.py _save): storages become
    ('storage', type, key, location, numel), keyed in order of first appearance."""

    def __init__(self, f, protocol):
        super().__init__(f, protocol=protocol)
        self.keys = {}
        self.storages = {}

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            key = self.keys.setdefault(id(obj), str(len(self.keys)))
            self.storages[key] = obj
            return ("storage", obj.cls, key, "cpu", obj.numel)
        return None


def pickle_obj(obj, protocol=2):
    buf = io.BytesIO()
    p = TorchPickler(buf, protocol)
    p.dump(obj)
    return buf.getvalue(), p.storages


# ---------------------------------------------------------------------------------------------
# Zip layout of caffe2::serialize::PyTorchStreamWriter as used by torch.save.

def write_zip(path, records, deflate=False):
    stem = os.path.splitext(os.path.basename(path))[0]
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in records:
            zi = zipfile.ZipInfo("%s/%s" % (stem, name), date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
            start = zf.fp.tell() + 30 + len(zi.filename.encode()) + 4
            pad = (-start) % 64
            zi.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            zf.writestr(zi, data)


def torch_records(pkl, storages, byteorder=b"little", drop=()):
    recs = [("data.pkl", pkl), (".format_version", b"1"), (".storage_alignment", b"64"),
            ("byteorder", byteorder)]
    recs += [("data/%s" % k, s.data) for k, s in storages.items()]
    recs += [("version", b"3\n"), (".data/serialization_id", b"1234567890" * 4)]
    return [r for r in recs if r[0] not in drop]


def save(path, obj, protocol=2, deflate=False, byteorder=b"little", drop=()):
    pkl, storages = pickle_obj(obj, protocol)
    write_zip(path, torch_records(pkl, storages, byteorder, drop), deflate)
    return pkl


def save_raw_pickle(path, pkl, storages=None):
    write_zip(path, torch_records(pkl, storages or {}))


# ---------------------------------------------------------------------------------------------

def main():
    os.makedirs(SEEDS_PT, exist_ok=True)
    os.makedirs(SEEDS_PKL, exist_ok=True)
    out = lambda name: os.path.join(HERE, name)
    pkls = {}

    # A state dict like model.state_dict(): OrderedDict in insertion (not sorted) order, every
    # storage dtype, a 0-d scalar, an empty tensor, and the `_metadata` attribute -> BUILD.
    sd = collections.OrderedDict()
    sd["w.f32"] = tensor("FloatStorage", [i * 0.5 - 1 for i in range(6)], (2, 3))
    sd["w.bf16"] = tensor("BFloat16Storage", [0x3F80, 0xC000, 0x3E80], (3,))
    sd["w.f16"] = tensor("HalfStorage", [1.0, -4.0], (2,))
    sd["n.i64"] = tensor("LongStorage", [1, -2, 3000000000, -9000000000000000000], (4,))
    sd["m.bool"] = tensor("BoolStorage", [True, False, True], (3,))
    sd["m.u8"] = tensor("ByteStorage", [0, 255], (2,))
    sd["m.i8"] = tensor("CharStorage", [-128, 127], (2,))
    sd["m.i16"] = tensor("ShortStorage", [-300, 300], (2,))
    sd["m.i32"] = tensor("IntStorage", [-70000, 70000], (2,))
    sd["m.f64"] = tensor("DoubleStorage", [0.1, -2.5], (2,))
    sd["s.scalar"] = tensor("FloatStorage", [3.25], ())
    sd["x.empty"] = tensor("FloatStorage", [], (0, 3))
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("w", {"version": 2})])
    pkls["state_dict"] = save(out("state_dict.pt"), sd)

    # Views: five tensors over one 12-float storage (values 0..11): the full matrix, a
    # transposed view with storage_offset 1, a contiguous row at offset 4, a strided column,
    # and a stride-0 broadcast.
    st = Storage("FloatStorage", [float(i) for i in range(12)])
    views = collections.OrderedDict()
    views["full"] = Tensor(st, 0, (3, 4), (4, 1))
    views["t"] = Tensor(st, 1, (3, 2), (1, 4))
    views["row"] = Tensor(st, 4, (4,), (1,))
    views["col"] = Tensor(st, 2, (3,), (4,))
    views["bcast"] = Tensor(st, 11, (2, 3), (0, 0))
    pkls["views"] = save(out("views.pt"), views)

    pkls["bare"] = save(out("bare.pt"), tensor("FloatStorage", [1.0, 2.0, 3.0, 4.0], (2, 2)))
    pkls["param"] = save(out("param.pt"),
                         Parameter(tensor("FloatStorage", [0.5, 1.5, 2.5], (3,))))

    # Protocol 4 (FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL, SHORT_BINBYTES, EMPTY_SET +
    # ADDITEMS), a plain dict, and non-tensor values that must be skipped.
    p4 = {"a": tensor("FloatStorage", [1.0, 2.0], (2,)),
          "meta": {"bytes": b"\x00\x01", "set": {1, 2}, "f": 0.5},
          "b": tensor("IntStorage", [7, -7], (2,))}
    pkls["proto4"] = save(out("proto4.pt"), p4, protocol=4)

    # Every record deflated (torch never does this, other zip tools might).
    d = collections.OrderedDict()
    d["d"] = tensor("FloatStorage", [i * 0.25 for i in range(64)], (8, 8))
    pkls["deflated"] = save(out("deflated.pt"), d, deflate=True)

    # A plain dict mixing tensors with values the reader skips (ints, floats, strings, None,
    # bools, big ints, nested containers -- one of them holding a tensor).
    mixed = {"step": 10, "t": tensor("FloatStorage", [1.0, -1.0], (2,)), "name": "adam",
             "nested": {"x": [1, 2, (3, 4)], "inner": tensor("FloatStorage", [9.0], (1,))},
             "lr": 0.5, "none": None, "flag": True, "big": 2 ** 70, "neg": -(2 ** 40)}
    pkls["mixed"] = save(out("mixed.pt"), mixed)

    # A torch.save-format reference for the writer: same tensors as test_writer_matches_python.
    ref = collections.OrderedDict()
    ref["a"] = tensor("FloatStorage", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3))
    ref["b"] = tensor("BFloat16Storage", [0x3F80, 0x4000, 0x4040, 0x4080], (4,))
    ref["c"] = tensor("LongStorage", [-5], ())
    ref["d"] = tensor("FloatStorage", [float(i) for i in range(6)], (2, 1, 3, 1))
    ref["e"] = tensor("FloatStorage", [7.0], (1,))
    save(out("writer_ref.pt"), ref)
    save(out("writer_bare_ref.pt"), tensor("HalfStorage", [1.0, 2.0, 3.0], (3,)))

    # ---- files the reader must refuse, each with one specific problem
    with open(out("bad_not_zip.pt"), "wb") as f:
        f.write(b"this is not a zip archive\n")
    with open(out("bad_legacy.pt"), "wb") as f:  # pre-1.6 torch.save: raw pickles, no zip
        f.write(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.")
    write_zip(out("bad_no_pkl.pt"), [("data/0", b"\0" * 8), ("version", b"3\n")])
    cmd = b"touch twn_ptfile_pwned_marker"
    bad_global = (b"\x80\x02cos\nsystem\nq\x00X" + struct.pack("<I", len(cmd)) + cmd +
                  b"q\x01\x85q\x02Rq\x03.")
    pkls["bad_global"] = bad_global
    save_raw_pickle(out("bad_global.pt"), bad_global)
    one = collections.OrderedDict([("w", tensor("FloatStorage", [1.0, 2.0], (2,)))])
    save(out("bad_storage_key.pt"), one, drop=("data/0",))
    s6 = Storage("FloatStorage", [float(i) for i in range(6)])
    save(out("bad_strides.pt"), collections.OrderedDict([("w", Tensor(s6, 0, (4,), (3,)))]))
    short = Storage("FloatStorage", [1.0, 2.0, 3.0, 4.0], numel=8)
    save(out("bad_storage_short.pt"),
         collections.OrderedDict([("w", Tensor(short, 0, (8,), (1,)))]))
    full_pkl, full_st = pickle_obj(one)
    write_zip(out("bad_truncated.pt"), torch_records(full_pkl[: len(full_pkl) // 2], full_st))
    bad_opcode = b"\x80\x02}q\x00\xff."
    pkls["bad_opcode"] = bad_opcode
    save_raw_pickle(out("bad_opcode.pt"), bad_opcode)
    save(out("bad_big_endian.pt"), one, byteorder=b"big")

    # ---- fuzz seeds
    for name in sorted(os.listdir(HERE)):
        if name.endswith(".pt"):
            with open(out(name), "rb") as f, open(os.path.join(SEEDS_PT, name), "wb") as g:
                g.write(f.read())
    for name, pkl in sorted(pkls.items()):
        with open(os.path.join(SEEDS_PKL, name + ".pkl"), "wb") as g:
            g.write(pkl)


if __name__ == "__main__":
    main()
