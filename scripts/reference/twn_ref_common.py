"""twn_ref_common.py — the pure-Python half of the TWN reference (no torch, no numpy).

Everything here is shared by twn_reference.py (which runs the model with torch + transformers +
peft on the GPU box) and test_selfcheck.py (which runs here, with the standard library only).
It holds every rule of engine/manifest.h that is not a tensor operation:

  * manifest loading and validation (twn.json; unknown keys are an error, like the C loader);
  * item reading (JSONL) and instruction resolution;
  * template rendering (single pass over {instruction} {images} {text}) and the split at {cot};
  * token bytes (byte-level BPE inverse map, added tokens, ids with no token) and the stop-string
    rule, checked on the bytes of the generated tokens;
  * the greedy decode driver (prefill logits -> token, feed token -> next token ...);
  * routing (adaptive / never / always / budget=F), pooling row selection, gate state-dict keys;
  * 3-stream (M-RoPE) position ids, <|image_pad|> expansion;
  * the orchestration of the TWN steps over an abstract engine (run_twn), so that the order of
    the steps and the names of the golden tensors are exercised by the self-check with a fake
    engine, and by the real run with the torch engine.

Semantics notes that go beyond the manifest.h comment (they are the reference's reading of it;
the C engine must do the same — see README.md "Decisions"):
  * A stop string is searched in the concatenated BYTES of the generated tokens only (never the
    prompt), after every generated token.  Token bytes: an added token -> its content (UTF-8);
    a vocab token -> its byte-level string mapped back through GPT-2 bytes_to_unicode; an id with
    no token at all (the padded embedding rows 151669..151935 of the real vocab, which a random
    tiny model can generate) -> no bytes (tokenizers' decode skips them too).
  * When a stop string first occurs, the CoT is the generated tokens BEFORE the token that holds
    the first byte of that occurrence (so a token that straddles the start of the stop string is
    dropped with it).  If several stop strings complete at the same token, the occurrence that
    starts earliest wins.  Generated tokens counted against max_think_tokens include the stop
    tokens.  If no stop string occurs, the CoT is all max_think_tokens tokens.
  * Greedy = argmax of the last position's logits in the model's dtype, lowest index on ties
    (torch.argmax returns the first maximal index).
  * budget=F: items are cut into consecutive windows of n items (the last may be shorter); each
    window thinks for its ceil(F*n - 1e-9) highest p_think items (in double: the allowance
    makes budget=0.28 of 25 items 7, not the 8 of 0.28*25 = 7.000000000000001; engine/twn.c does
    the same), ties broken by item order.  The threshold is not applied in budget mode.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import re
import struct
import zipfile

# --------------------------------------------------------------------------------------------
# manifest

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "tanh")
GATE_INPUTS = ("pooled", "pooled_normalized")
MAX_STOPS = 8  # TWN_MAX_STOPS in engine/manifest.h

DEFAULT_TEMPLATES = {
    "embed": "<|im_start|>user\n{instruction}{images}{text}<|im_end|>\n<|im_start|>assistant\n",
    "reason": "<|im_start|>user\n{instruction}{images}{text}<|im_end|>\n<|im_start|>assistant\n<think>\n",
    "embed_cot": "<|im_start|>user\n{instruction}{images}{text}<|im_end|>\n<|im_start|>assistant\n<think>\n{cot}</think>\n\n",
    "image": "<|vision_start|><|image_pad|><|vision_end|>",
}

# The documented defaults (engine/manifest.h header).  A key absent from twn.json takes this
# value; the effective manifest is recorded in every golden so a difference is visible.
MANIFEST_DEFAULTS = {
    "format": "twn/1",
    "base": "base",
    "adapters": {"embedding": "embedding", "reasoning": "reasoning"},
    "gate": {"path": "gate_mlp.pt", "activation": "gelu", "input": "pooled"},
    "queries": "queries.pt",
    "pooling": "query_mean",
    "normalize": True,
    "threshold": 0.5,
    "max_think_tokens": 256,
    "stop": ["</think>", "<|im_end|>"],
    "sampling": {"temperature": 0, "top_k": 0, "top_p": 1.0, "seed": 0},
    "default_instruction": "",
    "templates": dict(DEFAULT_TEMPLATES),
}

_NESTED = ("adapters", "gate", "sampling", "templates")
# Top-level keys engine/manifest.c accepts and ignores.
_FREE_KEYS = ("name", "comment")


class ManifestError(ValueError):
    pass


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def manifest_path_of(path):
    """twn.json path for a file path or a directory holding twn.json (like twn_manifest_load)."""
    if os.path.isdir(path):
        return os.path.join(path, "twn.json")
    return path


def parse_manifest(text, path="twn.json"):
    """Parses and validates twn.json text.  Returns a dict with every key filled (defaults for
    absent keys), plus "_dir" (the manifest's directory), "_path" and resolved absolute paths
    "_base", "_embedding", "_reasoning", "_gate", "_queries".  Errors name the key."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError("%s: not valid JSON: %s" % (path, e))
    if not isinstance(raw, dict):
        raise ManifestError("%s: the top level must be an object" % path)
    for k in raw:
        if k not in MANIFEST_DEFAULTS and k not in _FREE_KEYS:
            raise ManifestError("%s: unknown key '%s'" % (path, k))
    m = {k: raw[k] for k in _FREE_KEYS if k in raw}
    for k, dv in MANIFEST_DEFAULTS.items():
        if k in _NESTED:
            sub = raw.get(k, {})
            if not isinstance(sub, dict):
                raise ManifestError("%s: '%s' must be an object" % (path, k))
            for sk in sub:
                if sk not in dv:
                    raise ManifestError("%s: unknown key '%s.%s'" % (path, k, sk))
            merged = dict(dv)
            merged.update(sub)
            m[k] = merged
        else:
            m[k] = raw.get(k, dv)

    def need(cond, key, what):
        if not cond:
            raise ManifestError("%s: '%s' %s (got %r)" % (path, key, what, _get(m, key)))

    need(m["format"] == "twn/1", "format", 'must be "twn/1"')
    for key in ("base", "queries", "adapters.embedding", "adapters.reasoning", "gate.path"):
        v = _get(m, key)
        need(isinstance(v, str) and v != "", key, "must be a non-empty string (a path)")
    need(m["gate"]["activation"] in ACTIVATIONS, "gate.activation", "must be one of %s" % "|".join(ACTIVATIONS))
    need(m["gate"]["input"] in GATE_INPUTS, "gate.input", "must be one of %s" % "|".join(GATE_INPUTS))
    pooling = m["pooling"]
    need(isinstance(pooling, str) and (pooling in ("query_mean", "last_token") or
                                       (pooling.startswith("token:") and len(pooling) > 6)),
         "pooling", "must be query_mean | last_token | token:<text>")
    need(isinstance(m["normalize"], bool), "normalize", "must be true or false")
    # ranges as engine/manifest.c (get_num: any JSON number in [lo, hi]; integers truncated)
    need(_is_num(m["threshold"]) and 0 <= m["threshold"] <= 1, "threshold", "must be a number in [0, 1]")
    need(_is_num(m["max_think_tokens"]) and 0 <= m["max_think_tokens"] <= (1 << 20), "max_think_tokens",
         "must be a number in [0, 1048576]")
    m["max_think_tokens"] = int(m["max_think_tokens"])
    stops = m["stop"]
    need(isinstance(stops, list) and all(isinstance(s, str) and s for s in stops), "stop",
         "must be a list of non-empty strings")
    need(len(stops) <= MAX_STOPS, "stop", "has more than %d entries" % MAX_STOPS)
    s = m["sampling"]
    need(_is_num(s["temperature"]) and 0 <= s["temperature"] <= 100, "sampling.temperature", "must be in [0, 100]")
    need(_is_num(s["top_k"]) and 0 <= s["top_k"] <= 1e7, "sampling.top_k", "must be in [0, 1e7]")
    need(_is_num(s["top_p"]) and 0 <= s["top_p"] <= 1, "sampling.top_p", "must be in [0, 1]")
    need(_is_num(s["seed"]) and 0 <= s["seed"] <= 2.0 ** 53, "sampling.seed", "must be in [0, 2^53]")
    need(isinstance(m["default_instruction"], str), "default_instruction", "must be a string")
    for name in ("embed", "reason", "embed_cot", "image"):
        need(isinstance(m["templates"][name], str), "templates." + name, "must be a string")
    t = m["templates"]
    need(t["embed_cot"].count("{cot}") == 1, "templates.embed_cot", "must contain {cot} exactly once")
    for name in ("embed", "reason", "image"):
        need("{cot}" not in t[name], "templates." + name, "must not contain {cot}")
    need("{images}" not in t["image"], "templates.image", "must not contain {images}")
    need("{images}" not in t["embed_cot"].split("{cot}")[1], "templates.embed_cot",
         "must have {images} before {cot}")

    d = os.path.dirname(os.path.abspath(path))
    m["_path"] = os.path.abspath(path)
    m["_dir"] = d
    m["_base"] = _resolve(d, m["base"])
    m["_embedding"] = _resolve(d, m["adapters"]["embedding"])
    m["_reasoning"] = _resolve(d, m["adapters"]["reasoning"])
    m["_gate"] = _resolve(d, m["gate"]["path"])
    m["_queries"] = _resolve(d, m["queries"])
    return m


def load_manifest(path):
    """Reads twn.json (file or directory); returns (manifest dict, raw bytes)."""
    p = manifest_path_of(path)
    with open(p, "rb") as f:
        data = f.read()
    return parse_manifest(data.decode("utf-8"), p), data


def public_manifest(m):
    """The manifest without the private "_..." entries (for metadata)."""
    return {k: v for k, v in m.items() if not k.startswith("_")}


def is_greedy(m):
    return m["sampling"]["temperature"] == 0


def _get(m, dotted):
    v = m
    for part in dotted.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def _resolve(d, p):
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(d, p))


def sha256_bytes(b):
    return hashlib.sha256(b).hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(root):
    """{relative path: sha256} of every regular file under root (sorted)."""
    out = {}
    for dp, dns, fns in os.walk(root):
        dns.sort()
        for fn in sorted(fns):
            full = os.path.join(dp, fn)
            if os.path.isfile(full) and not os.path.islink(full):
                out[os.path.relpath(full, root)] = sha256_file(full)
    return dict(sorted(out.items()))


def checkpoint_sha256(m):
    """{path relative to the manifest's directory: sha256} of the files a golden depends on:
    the manifest, every file under base/ and the two adapter directories, gate and queries."""
    out = {os.path.relpath(m["_path"], m["_dir"]): sha256_file(m["_path"])}
    for d in (m["_base"], m["_embedding"], m["_reasoning"]):
        for rel, h in tree_sha256(d).items():
            out[os.path.relpath(os.path.join(d, rel), m["_dir"])] = h
    for f in (m["_gate"], m["_queries"]):
        out[os.path.relpath(f, m["_dir"])] = sha256_file(f)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------
# items

def read_items(path):
    """Reads items.jsonl: one JSON object a line (blank lines skipped).  Fields: id (string or
    integer, required), text (string, default ""), instruction (string or null/absent),
    image (a path relative to the file, or a list of them; optional).  Other fields are kept
    and ignored.  Returns a list of dicts with "id" as a string and "images" as a list of
    absolute paths."""
    items = []
    base = os.path.dirname(os.path.abspath(path))
    seen = set()
    with open(path, "r", encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError("%s:%d: not valid JSON: %s" % (path, ln, e))
            items.append(normalize_item(obj, "%s:%d" % (path, ln), base))
            if items[-1]["id"] in seen:
                raise ValueError("%s:%d: duplicate id %r" % (path, ln, items[-1]["id"]))
            seen.add(items[-1]["id"])
    return items


def normalize_item(obj, where="item", base="."):
    if not isinstance(obj, dict):
        raise ValueError("%s: an item must be a JSON object" % where)
    if "id" not in obj or not (isinstance(obj["id"], str) or _is_int(obj["id"])):
        raise ValueError("%s: 'id' (string or integer) is required" % where)
    text = obj.get("text", "")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ValueError("%s: 'text' must be a string" % where)
    instr = obj.get("instruction")
    if instr is not None and not isinstance(instr, str):
        raise ValueError("%s: 'instruction' must be a string or null" % where)
    img = obj.get("image")
    if img is None:
        images = []
    elif isinstance(img, str):
        images = [img]
    elif isinstance(img, list) and all(isinstance(x, str) for x in img):
        images = list(img)
    else:
        raise ValueError("%s: 'image' must be a path or a list of paths" % where)
    out = dict(obj)
    out["id"] = str(obj["id"])
    out["text"] = text
    out["instruction"] = instr
    out["images"] = [p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)) for p in images]
    return out


def resolve_instruction(item, m):
    """An item's instruction; manifest default_instruction when the item has none (absent or
    null).  An explicit "" is kept as ""."""
    instr = item.get("instruction")
    return m["default_instruction"] if instr is None else instr


# --------------------------------------------------------------------------------------------
# templates

_PLACEHOLDER = re.compile(r"\{(instruction|images|text|cot)\}")


def render_template(tpl, instruction, images, text):
    """Substitutes {instruction}, {images}, {text} in ONE left-to-right pass: substituted values
    are never scanned again (an item text containing "{text}" stays literal), every other brace
    is literal.  {cot} is an error here (split embed_cot first)."""

    def sub(mo):
        name = mo.group(1)
        if name == "cot":
            raise ValueError("render_template: {cot} must be split off first (split_cot)")
        return {"instruction": instruction, "images": images, "text": text}[name]

    return _PLACEHOLDER.sub(sub, tpl)


def images_string(image_tpl, n_images):
    """The {images} value: the "image" template once per image."""
    return image_tpl * n_images


def split_cot(tpl):
    """embed_cot template -> (prefix template, suffix template), split at the one {cot}."""
    parts = tpl.split("{cot}")
    if len(parts) != 2:
        raise ValueError("embed_cot template must contain {cot} exactly once")
    return parts[0], parts[1]


def count_placeholder(tpl, name):
    return sum(1 for mo in _PLACEHOLDER.finditer(tpl) if mo.group(1) == name)


# --------------------------------------------------------------------------------------------
# tokens -> bytes, and the stop-string rule

def bytes_to_unicode():
    """GPT-2's byte -> unicode map (tokenizers' ByteLevel, transformers' bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


_BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}


class TokenTable:
    """Token id -> bytes, from a parsed tokenizer.json (BPE + ByteLevel, as Qwen uses).

    Added tokens (special or not) decode to their content; vocab tokens to the bytes of their
    byte-level string; ids that are neither (e.g. padded embedding rows) to b""."""

    def __init__(self, tokenizer_json):
        model = tokenizer_json.get("model") or {}
        if model.get("type") not in (None, "BPE"):
            raise ValueError("tokenizer.json: model type %r is not BPE" % model.get("type"))
        vocab = model.get("vocab") or {}
        self.vocab = dict(vocab)
        self.id_to_str = {i: s for s, i in vocab.items()}
        self.added = {}
        self.added_by_content = {}
        for a in tokenizer_json.get("added_tokens") or []:
            self.added[int(a["id"])] = a
            self.added_by_content[a["content"]] = int(a["id"])
        self._cache = {}

    @classmethod
    def from_file(cls, path):
        with open(path, "r", encoding="utf-8") as f:
            return cls(json.load(f))

    def size(self):
        ids = list(self.id_to_str) + list(self.added)
        return (max(ids) + 1) if ids else 0

    def token_bytes(self, i):
        b = self._cache.get(i)
        if b is not None:
            return b
        if i in self.added:
            b = self.added[i]["content"].encode("utf-8")
        elif i in self.id_to_str:
            try:
                b = bytes(_BYTE_DECODER[c] for c in self.id_to_str[i])
            except KeyError as e:
                raise ValueError("token %d: character %r is not in the byte-level alphabet" % (i, e.args[0]))
        else:
            b = b""
        self._cache[i] = b
        return b

    def token_id(self, text):
        """Id of a token given as text: an added token's content, else a vocab entry in its
        byte-level spelling (what the C twn_tok_id does).  None when absent."""
        if text in self.added_by_content:
            return self.added_by_content[text]
        return self.vocab.get(text)

    def is_special(self, i):
        return i in self.added and bool(self.added[i].get("special"))

    def decode_bytes(self, ids):
        return b"".join(self.token_bytes(i) for i in ids)


class StopScanner:
    """Feeds generated tokens one at a time; reports when a stop string first occurs in the
    bytes generated so far.  push() returns None, or (cot_len, stop_index): the CoT is the first
    cot_len generated tokens (the token holding the stop's first byte and everything after it
    are dropped)."""

    def __init__(self, stops, token_bytes):
        self.stops = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in stops]
        if any(len(s) == 0 for s in self.stops):
            raise ValueError("empty stop string")
        self.token_bytes = token_bytes
        self.buf = bytearray()
        self.starts = []  # byte offset where each generated token starts

    def push(self, tok):
        prev = len(self.buf)
        self.starts.append(prev)
        self.buf += self.token_bytes(tok)
        best = None
        for si, s in enumerate(self.stops):
            # an occurrence that is new must end inside the bytes just added
            p = self.buf.find(s, max(0, prev - len(s) + 1))
            if p >= 0 and (best is None or p < best[0]):
                best = (p, si)
        if best is None:
            return None
        cot_len = bisect.bisect_right(self.starts, best[0]) - 1
        return cot_len, best[1]


def decode_loop(step, max_tokens, scanner, first_pos):
    """The CoT decode driver.

    step(prev_token, position) -> (token, margin): with prev_token None it returns the argmax of
    the prefill's last logits; otherwise it feeds prev_token at `position` (KV cache) and returns
    the argmax of the new logits.  The k-th generated token (0-based) is fed at first_pos + k.
    Returns {"gen": all generated ids, "cot": CoT ids, "margins": top1-top2 logit per step,
             "stop": index of the stop string that ended it or None, "reason": "stop"|"max_tokens"}."""
    gen, margins = [], []
    while len(gen) < max_tokens:
        if gen:
            tok, margin = step(gen[-1], first_pos + len(gen) - 1)
        else:
            tok, margin = step(None, None)
        gen.append(int(tok))
        margins.append(float(margin))
        hit = scanner.push(int(tok))
        if hit is not None:
            cot_len, si = hit
            return {"gen": gen, "cot": gen[:cot_len], "margins": margins, "stop": si, "reason": "stop"}
    return {"gen": gen, "cot": list(gen), "margins": margins, "stop": None, "reason": "max_tokens"}


def pick_stop_probe(gen, token_bytes, existing=(), min_index=2):
    """A stop string that the recorded greedy CoT `gen` would hit, used to make a second golden
    that exercises the stop rule on a random model (which never emits </think>).  It spans two
    tokens and, when possible, starts one character inside the first one (so the straddling
    token is dropped).  Returns (probe text, expected cot_len) or None.  The probe must be valid
    UTF-8, printable, absent from the bytes before the intended position, and not equal to an
    existing stop."""
    tb = [token_bytes(t) for t in gen]
    for i in range(min_index, len(gen) - 1):
        if not tb[i] or not tb[i + 1]:
            continue
        pair = tb[i] + tb[i + 1]
        try:
            text = pair.decode("utf-8")
        except UnicodeDecodeError:
            continue
        cands = []
        try:
            first = tb[i].decode("utf-8")
        except UnicodeDecodeError:
            first = ""
        if len(first) >= 2:
            cands.append(text[1:])  # starts inside token i
        cands.append(text)
        for cand in cands:
            if len(cand) < 2 or not cand.isprintable() or not cand.strip() or cand in existing:
                continue
            cb = cand.encode("utf-8")
            start = len(b"".join(tb[:i + 2])) - len(cb)
            prefix = b"".join(tb[:i + 2])
            if prefix.find(cb) != start:  # must first occur where intended
                continue
            return cand, i
    return None


# --------------------------------------------------------------------------------------------
# modes, routing, pooling

def parse_mode(s):
    """"adaptive" | "never" | "always" | "budget=F" (0 <= F <= 1) -> (name, F or None)."""
    if s in ("adaptive", "never", "always"):
        return s, None
    if s.startswith("budget="):
        try:
            f = float(s[len("budget="):])
        except ValueError:
            raise ValueError("mode %r: budget=F needs a number" % s)
        if not (0.0 <= f <= 1.0) or math.isnan(f):
            raise ValueError("mode %r: F must be in [0, 1]" % s)
        return "budget", f
    raise ValueError("mode %r: expected adaptive | never | always | budget=F" % s)


def budget_select(p, fraction, window=None):
    """budget=F: per consecutive window of `window` items (all items when None/0), the
    ceil(F*n - 1e-9) items with the highest p think; ties go to the earlier item.  -> list of bools."""
    n_all = len(p)
    if n_all == 0:
        return []
    w = window if window else n_all
    if w < 1:
        raise ValueError("budget window must be >= 1")
    out = [False] * n_all
    for w0 in range(0, n_all, w):
        idx = list(range(w0, min(w0 + w, n_all)))
        n = len(idx)
        k = min(n, max(0, int(math.ceil(fraction * n - 1e-9))))
        for i in sorted(idx, key=lambda j: (-p[j], j))[:k]:
            out[i] = True
    return out


def decide_routes(mode, p, threshold, window=None):
    """Route per item: 1 = hard (think), 0 = easy."""
    name, f = parse_mode(mode)
    if name == "adaptive":
        return [1 if x >= threshold else 0 for x in p]
    if name == "never":
        return [0] * len(p)
    if name == "always":
        return [1] * len(p)
    return [1 if b else 0 for b in budget_select(p, f, window)]


def pool_rows(pooling, n_ids, n_queries, ids, token_id=None):
    """Rows of the pass's hidden states that pooling averages (sequence = ids then queries).
    query_mean: the K query rows; last_token: the last row; token:<t>: the row of the last
    occurrence of token <t> among ids (token_id given by the caller)."""
    total = n_ids + n_queries
    if total == 0:
        raise ValueError("empty sequence")
    if pooling == "query_mean":
        if n_queries < 1:
            raise ValueError("query_mean pooling needs at least one query")
        return list(range(n_ids, total))
    if pooling == "last_token":
        return [total - 1]
    if pooling.startswith("token:"):
        if token_id is None:
            raise ValueError("pooling %r: the token is not in the tokenizer" % pooling)
        for j in range(n_ids - 1, -1, -1):
            if ids[j] == token_id:
                return [j]
        raise ValueError("pooling %r: token id %d does not occur in the prompt" % (pooling, token_id))
    raise ValueError("unknown pooling %r" % pooling)


# --------------------------------------------------------------------------------------------
# gate state dict

_GATE_KEY = re.compile(r"^((?:.*\.)?)(\d+)\.(weight|bias)$")


def parse_gate_state_dict(shapes, hidden=None):
    """shapes: {key: shape tuple} of gate_mlp.pt.  Keys must be "<prefix><i>.weight" /
    "<prefix><i>.bias" with one common prefix (e.g. "" or "net."); weight [out, in], bias [out]
    (a missing bias means none).  Layers in index order; in of the first = hidden (when given),
    in of each next = out of the previous, out of the last = 1.
    Returns [{"index", "weight", "bias", "in", "out"}, ...]."""
    if not shapes:
        raise ValueError("gate state dict is empty")
    prefixes, layers = set(), {}
    for k, shp in shapes.items():
        mo = _GATE_KEY.match(k)
        if not mo:
            raise ValueError("gate state dict: key %r is not <prefix><i>.weight|bias" % k)
        prefixes.add(mo.group(1))
        idx = int(mo.group(2))
        layers.setdefault(idx, {})[mo.group(3)] = (k, tuple(int(x) for x in shp))
    if len(prefixes) != 1:
        raise ValueError("gate state dict: keys have different prefixes %s" % sorted(prefixes))
    out, prev_out = [], hidden
    for idx in sorted(layers):
        ent = layers[idx]
        if "weight" not in ent:
            raise ValueError("gate state dict: layer %d has a bias but no weight" % idx)
        wk, ws = ent["weight"]
        if len(ws) != 2 or ws[0] < 1 or ws[1] < 1:
            raise ValueError("gate state dict: %s has shape %s, expected [out, in]" % (wk, list(ws)))
        bk = None
        if "bias" in ent:
            bk, bs = ent["bias"]
            if bs != (ws[0],):
                raise ValueError("gate state dict: %s has shape %s, expected [%d]" % (bk, list(bs), ws[0]))
        if prev_out is not None and ws[1] != prev_out:
            raise ValueError("gate state dict: %s takes %d inputs, expected %d" % (wk, ws[1], prev_out))
        out.append({"index": idx, "weight": wk, "bias": bk, "in": ws[1], "out": ws[0]})
        prev_out = ws[0]
    if out[-1]["out"] != 1:
        raise ValueError("gate state dict: the last layer has %d outputs, expected 1" % out[-1]["out"])
    return out


# --------------------------------------------------------------------------------------------
# positions and image placeholders

def text_positions(n, start=0):
    """3-stream positions of n text tokens: all streams equal, start..start+n-1."""
    row = list(range(start, start + n))
    return [row, list(row), list(row)]


def mrope_positions(ids, grids, image_token_id, merge, extra=0):
    """Port of Qwen3VLModel.get_rope_index for images (t=1 per image), plus `extra` trailing
    text-like rows (the query vectors): a text token takes the next position on all 3 streams;
    an image of grid (t, gh, gw) occupies t*(gh/merge)*(gw/merge) consecutive image tokens with
    (p+ti, p+hi, p+wi) in row-major order, and the next position after it is
    p + max(t, gh/merge, gw/merge).  Returns [[T...], [H...], [W...]]."""
    pos = [[], [], []]
    nxt, i, gi = 0, 0, 0
    n = len(ids)
    while i < n:
        if ids[i] == image_token_id:
            if gi >= len(grids):
                raise ValueError("more images in the ids than grids")
            t, gh, gw = (int(x) for x in grids[gi])
            gi += 1
            if gh % merge or gw % merge:
                raise ValueError("grid %s not divisible by merge %d" % ((t, gh, gw), merge))
            h, w = gh // merge, gw // merge
            cnt = t * h * w
            if ids[i:i + cnt] != [image_token_id] * cnt:
                raise ValueError("image at %d: expected %d consecutive image tokens" % (i, cnt))
            for a in range(t):
                for b in range(h):
                    for c in range(w):
                        pos[0].append(nxt + a)
                        pos[1].append(nxt + b)
                        pos[2].append(nxt + c)
            i += cnt
            nxt += max(t, h, w)
        else:
            for s in range(3):
                pos[s].append(nxt)
            nxt += 1
            i += 1
    if gi != len(grids):
        raise ValueError("%d grids but %d images in the ids" % (len(grids), gi))
    for k in range(extra):
        for s in range(3):
            pos[s].append(nxt + k)
    return pos


def next_position(pos):
    """The position the next decoded token takes: max over all streams + 1."""
    return max(max(r) for r in pos) + 1 if pos and pos[0] else 0


def expand_image_pads(ids, image_token_id, counts):
    """Replaces the j-th image token with counts[j] copies (what the processor does)."""
    out, j = [], 0
    for t in ids:
        if t == image_token_id:
            if j >= len(counts):
                raise ValueError("more image tokens than images")
            out.extend([image_token_id] * counts[j])
            j += 1
        else:
            out.append(t)
    if j != len(counts):
        raise ValueError("%d images but %d image tokens" % (len(counts), j))
    return out


# --------------------------------------------------------------------------------------------
# .pt container facts (for the C reader; spec §7 q7)

def pt_zip_facts(path):
    """Facts about a torch.save zip: entry names, compression, data offsets and whether each
    record's data starts on a 64-byte boundary.  Pure zipfile/struct."""
    facts = {"zip": zipfile.is_zipfile(path), "entries": []}
    if not facts["zip"]:
        return facts
    with open(path, "rb") as raw, zipfile.ZipFile(path) as z:
        for zi in z.infolist():
            raw.seek(zi.header_offset)
            hdr = raw.read(30)
            if len(hdr) < 30 or hdr[:4] != b"PK\x03\x04":
                raise ValueError("%s: bad local header for %s" % (path, zi.filename))
            name_len, extra_len = struct.unpack("<HH", hdr[26:30])
            data_off = zi.header_offset + 30 + name_len + extra_len
            facts["entries"].append({
                "name": zi.filename,
                "method": zi.compress_type,  # 0 stored, 8 deflated
                "size": zi.file_size,
                "data_offset": data_off,
                "aligned64": data_off % 64 == 0,
            })
    e = facts["entries"]
    facts["all_stored"] = all(x["method"] == 0 for x in e)
    data = [x for x in e if "/data/" in x["name"]]
    facts["data_records_aligned64"] = all(x["aligned64"] for x in data)
    pkl = [x["name"] for x in e if x["name"].endswith("/data.pkl") or x["name"] == "data.pkl"]
    facts["data_pkl"] = pkl[0] if pkl else None
    return facts


def pt_shapes(path):
    """Shapes in a torch.save zip without torch: a restricted unpickler that accepts only what a
    weights-only state_dict / bare tensor needs (OrderedDict, _rebuild_tensor_v2,
    _rebuild_parameter, storage classes).  Returns {key: (storage class, shape)} for a dict, or
    (storage class, shape) for a bare tensor.  For checks and tests; no tensor data is read."""
    import collections
    import pickle

    class _St:
        def __init__(self, kind):
            self.kind = kind

    class _T:
        def __init__(self, st, size):
            self.kind, self.shape = st.kind, tuple(int(x) for x in size)

    class _U(pickle.Unpickler):
        def find_class(self, mod, name):
            if mod == "collections" and name == "OrderedDict":
                return collections.OrderedDict
            if mod == "torch._utils" and name == "_rebuild_tensor_v2":
                return lambda st, off, size, stride, *rest: _T(st, size)
            if mod == "torch._utils" and name == "_rebuild_parameter":
                return lambda data, *rest: data
            if mod == "torch" and name.endswith("Storage"):
                return name
            raise pickle.UnpicklingError("global %s.%s is not allowed" % (mod, name))

        def persistent_load(self, pid):
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                raise pickle.UnpicklingError("unexpected persistent id %r" % (pid,))
            return _St(pid[1])

    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise ValueError("%s: expected one data.pkl, found %d" % (path, len(pkl)))
        with z.open(pkl[0]) as f:
            obj = _U(f).load()
    if isinstance(obj, _T):
        return (obj.kind, obj.shape)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(v, _T):
                raise ValueError("%s: entry %r is not a tensor" % (path, k))
            out[k] = (v.kind, v.shape)
        return out
    raise ValueError("%s: neither a tensor nor a dict of tensors (%s)" % (path, type(obj).__name__))


# --------------------------------------------------------------------------------------------
# safetensors serialization (fallback writer; spec §5.1)

SAFETENSORS_DTYPE_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                          "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def safetensors_serialize(entries, metadata=None):
    """entries: [(name, dtype string, shape list, raw little-endian bytes)] -> file bytes.
    The header is JSON, space-padded so the data starts on an 8-byte boundary; data packed in
    the given order with no gaps.  Used only if safetensors.torch.save_file refuses a file
    (e.g. several zero-element tensors, safetensors issue #280)."""
    header, off, blobs = {}, 0, []
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must be str -> str")
        header["__metadata__"] = dict(metadata)
    for name, dtype, shape, data in entries:
        if name in header:
            raise ValueError("duplicate tensor name %r" % name)
        n = 1
        for d in shape:
            n *= int(d)
        if len(data) != n * SAFETENSORS_DTYPE_SIZE[dtype]:
            raise ValueError("%s: %d bytes for %s %s" % (name, len(data), dtype, list(shape)))
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [off, off + len(data)]}
        off += len(data)
        blobs.append(bytes(data))
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def safetensors_parse(buf):
    """The inverse (for tests and tools): -> (metadata, {name: (dtype, shape, bytes)})."""
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        out[name] = (e["dtype"], e["shape"], buf[base + b:base + end])
    return meta, out


# --------------------------------------------------------------------------------------------
# the TWN steps over an abstract engine

class Engine:
    """What run_twn needs from a model runner.  Tensors are opaque to run_twn except where said.

    image_token_id, merge: ints (for positions).  n_queries: K.
    tokenize(text, image_paths) -> (ids list, vision or None); vision is a dict with at least
        "grids": [[t, gh, gw], ...] and is opaque otherwise.  With image_paths it must expand
        each <|image_pad|> to the image's token count (the processor path).
    token_bytes(id) -> bytes;  token_id(text) -> id or None.
    embed_pass(ids, vision, positions, rows) -> (pooled, record): the embedding adapter over
        ids followed by the K query vectors; pooled = mean of the final-norm hidden rows `rows`;
        record = {name: tensor} with names "hidden.embed", "hidden.layer<L>", "final",
        "logits_last" (logits at row len(ids)-1), optionally others.
    gate(e) -> (logit, p_think) floats, and the gate input per manifest (raw or normalized).
    normalize(e) -> e / |e|.
    reason_prefill(ids, vision, positions) -> (state, record) with the reasoning adapter;
        record like embed_pass's ("logits_last" = last prompt row).
    reason_step(state, prev_token or None, position) -> (token, margin).
    finish_reason(state, gen) -> {name: value} of extra checks (optional)."""


def run_twn(engine, m, items, mode, window=None, log=None):
    """Runs the manifest steps for all items.  Returns (tensors, summary):
    tensors = {"item.<i>.<name>": value} where ids are python int lists, scalars python floats
    or ints (the caller converts), and engine tensors pass through; summary = one dict per item.
    Phase 1: gate pass of every item; phase 2: routes (needs all p_think for budget);
    phase 3: CoT + embed_cot pass for the hard items."""
    log = log or (lambda *a: None)
    tpl = m["templates"]
    K = engine.n_queries
    token_id = None
    if m["pooling"].startswith("token:"):
        token_id = engine.token_id(m["pooling"][len("token:"):])
        if token_id is None:
            raise ValueError("pooling %r: not a token of the tokenizer" % m["pooling"])
    if not is_greedy(m):
        raise NotImplementedError("the reference implements greedy decoding only (sampling.temperature = 0)")
    for name in ("embed", "reason"):
        if count_placeholder(tpl[name], "images") > 1:
            raise ValueError("templates.%s: {images} more than once" % name)
    cot_prefix_tpl, cot_suffix_tpl = split_cot(tpl["embed_cot"])

    def prompt(t, item, images_elsewhere=False):
        imgs = item["images"]
        if imgs and count_placeholder(t, "images") != 1 and not images_elsewhere:
            raise ValueError("item %s has images but a template lacks {images}" % item["id"])
        text = render_template(t, resolve_instruction(item, m), images_string(tpl["image"], len(imgs)),
                               item["text"])
        return engine.tokenize(text, imgs if count_placeholder(t, "images") else [])

    def positions(ids, vision, extra):
        grids = vision["grids"] if vision else []
        return mrope_positions(ids, grids, engine.image_token_id, engine.merge, extra)

    T, summary, e0s, ps = {}, [], [], []
    for i, item in enumerate(items):
        P = "item.%d." % i
        ids, vision = prompt(tpl["embed"], item)
        pos = positions(ids, vision, K)
        rows = pool_rows(m["pooling"], len(ids), K, ids, token_id)
        e0, rec = engine.embed_pass(ids, vision, pos, rows)
        logit, p = engine.gate(e0)
        T[P + "gate_ids"] = ids
        T[P + "gate_position_ids"] = pos
        for k, v in rec.items():
            T[P + "gate_" + k] = v
        if vision is not None:
            for k, v in vision.items():
                if k != "grids":
                    T[P + k] = v
            T[P + "image_grid_thw"] = vision["grids"]
        T[P + "e0"] = e0
        T[P + "gate_logit"] = logit
        T[P + "p_think"] = p
        e0s.append(e0)
        ps.append(p)
        summary.append({"id": item["id"], "p_think": p, "gate_logit": logit, "n_gate_ids": len(ids)})
        log("item %d (%s): %d ids, p_think %.6f" % (i, item["id"], len(ids), p))

    routes = decide_routes(mode, ps, m["threshold"], window)
    for i, item in enumerate(items):
        P = "item.%d." % i
        T[P + "route"] = routes[i]
        summary[i]["route"] = routes[i]
        if not routes[i]:
            T[P + "embedding"] = engine.normalize(e0s[i]) if m["normalize"] else e0s[i]
            continue
        rids, rvision = prompt(tpl["reason"], item)
        rpos = positions(rids, rvision, 0)
        state, rrec = engine.reason_prefill(rids, rvision, rpos)
        T[P + "reason_ids"] = rids
        for k, v in rrec.items():
            T[P + "reason_" + k] = v
        scanner = StopScanner(m["stop"], engine.token_bytes)
        res = decode_loop(lambda prev, at: engine.reason_step(state, prev, at), m["max_think_tokens"],
                          scanner, next_position(rpos))
        extra = getattr(engine, "finish_reason", None)
        if extra is not None:
            for k, v in (extra(state, res["gen"]) or {}).items():
                T[P + k] = v
        T[P + "cot_gen_ids"] = res["gen"]
        T[P + "cot_ids"] = res["cot"]
        T[P + "cot_margin"] = res["margins"]
        T[P + "cot_stop"] = -1 if res["stop"] is None else res["stop"]
        pids, pvision = prompt(cot_prefix_tpl, item)
        sids, svision = prompt(cot_suffix_tpl, item, images_elsewhere=True)
        if svision is not None:
            raise ValueError("embed_cot suffix must not hold images")
        ecids = pids + res["cot"] + sids
        epos = positions(ecids, pvision, K)
        rows = pool_rows(m["pooling"], len(ecids), K, ecids, token_id)
        e1, erec = engine.embed_pass(ecids, pvision, epos, rows)
        T[P + "embed_cot_ids"] = ecids
        T[P + "embed_cot_position_ids"] = epos
        for k, v in erec.items():
            T[P + "embcot_" + k] = v
        T[P + "e1"] = e1
        T[P + "embedding"] = engine.normalize(e1) if m["normalize"] else e1
        summary[i].update(n_gen=len(res["gen"]), n_cot=len(res["cot"]), stop_reason=res["reason"],
                          stop=None if res["stop"] is None else m["stop"][res["stop"]])
        log("item %d (%s): hard, %d tokens generated, CoT %d, %s" %
            (i, item["id"], len(res["gen"]), len(res["cot"]), res["reason"]))
    return T, summary
