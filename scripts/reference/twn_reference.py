#!/usr/bin/env python3
"""twn_reference.py — golden outputs for the twn engine from Hugging Face transformers + peft.

    python3 twn_reference.py --model DIR --items items.jsonl --out GOLDEN.safetensors
            [--dtype fp32|bf16] [--device cpu|cuda] [--mode adaptive|never|always|budget=F]
            [--attn eager|sdpa] [--budget-window N] [--stop-probe-manifest PATH]
    python3 twn_reference.py --model DIR --check-load-only [--report-json PATH]

DIR is a TWN checkpoint directory holding twn.json (or the path of a twn.json file).  The steps
are those of engine/manifest.h; the rules that are not tensor operations (templates, stop strings,
routing, pooling rows, positions, the order of the steps and the names of the outputs) live in
twn_ref_common.py, shared with the pure-Python self-check (test_selfcheck.py).

What comes from transformers / peft and what is done here (see README.md for the source lines):
  * the backbone forward = Qwen3VLForConditionalGeneration.forward with the LoRA layers peft
    injected, the active adapter chosen with PeftModel.set_adapter;
  * input embeddings = model.get_input_embeddings()(ids) (the adapter-aware module), then the K
    query vectors appended, passed as inputs_embeds with explicit 3-stream position_ids and an
    all-ones attention_mask;
  * per-layer hidden states are taken with forward hooks on the decoder layers (their return
    value, before any DeepStack add) and on the final norm (model.model.language_model.norm);
    output_hidden_states=True is also requested and what its entries are is checked against the
    hooks and recorded (its last entry is post-norm in some versions and pre-norm in others);
  * pooling, the gate MLP, sigmoid and L2 normalization run in fp32 on the upcast hidden states;
  * the CoT decode is an explicit loop (prefill + past_key_values, argmax per step), not
    generate(), so the stop rule is ours; a no-cache forward over prompt + CoT re-checks it.
"""

from __future__ import annotations

import os
import sys

# No network, deterministic cuBLAS: must be set before torch / transformers are imported.
for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
               ("HF_HUB_DISABLE_TELEMETRY", "1"), ("TOKENIZERS_PARALLELISM", "false"),
               ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")):
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import twn_ref_common as C  # noqa: E402

GOLDEN_FORMAT = "twn-golden/1"


def build_parser():
    ap = argparse.ArgumentParser(
        description="TWN reference: run the twn.json steps with transformers + peft and write a golden "
                    "safetensors file (see scripts/reference/README.md).")
    ap.add_argument("--model", required=True, help="TWN checkpoint directory (holding twn.json) or a twn.json path")
    ap.add_argument("--items", help="items.jsonl (id, text, instruction, image)")
    ap.add_argument("--out", help="golden .safetensors to write (a .summary.json is written beside it)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--mode", default="adaptive", help="adaptive | never | always | budget=F (default adaptive)")
    ap.add_argument("--budget-window", type=int, default=0,
                    help="budget=F window size in items (default: all items are one window)")
    ap.add_argument("--attn", choices=("eager", "sdpa"), default="eager", help="attn_implementation")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--check-load-only", action="store_true",
                    help="load everything, print the load report (keys, shapes, configs) and exit")
    ap.add_argument("--report-json", help="also write the load report as JSON")
    ap.add_argument("--allow-load-problems", action="store_true",
                    help="run even if the load report lists problems (debugging only)")
    ap.add_argument("--no-recheck", action="store_true",
                    help="skip the no-cache forward that re-checks each KV-cache decode")
    ap.add_argument("--stop-probe-manifest",
                    help="after the run, write a copy of the manifest whose stop list adds a string that "
                         "the first long CoT contains (a second golden run with it exercises the stop rule)")
    ap.add_argument("--quiet", action="store_true")
    return ap


def parse_args(argv=None):
    ap = build_parser()
    a = ap.parse_args(argv)
    C.parse_mode(a.mode)  # validates
    if not a.check_load_only and (not a.items or not a.out):
        ap.error("--items and --out are required (unless --check-load-only)")
    if a.budget_window < 0:
        ap.error("--budget-window must be >= 0")
    return a


# --------------------------------------------------------------------------------------------
# helpers

@contextlib.contextmanager
def capture_logs(sink):
    """Collects Python warnings and transformers/peft log records (WARNING and up) into sink."""

    class _H(logging.Handler):
        def emit(self, r):
            sink.append("%s %s: %s" % (r.levelname, r.name, r.getMessage()))

    h = _H(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("transformers", "peft", "accelerate", "huggingface_hub")]
    for lg in loggers:
        lg.addHandler(h)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for lg in loggers:
                lg.removeHandler(h)
            for x in w:
                sink.append("warning %s: %s" % (x.category.__name__, x.message))


def _version_tuple(s):
    out = []
    for part in s.split(".")[:3]:
        num = ""
        for ch in part:
            if ch.isdigit():
                num += ch
            else:
                break
        out.append(int(num or 0))
    return tuple(out)


def _keys_of(load_result, name):
    if load_result is None:
        return None
    v = getattr(load_result, name, None)
    if v is None and isinstance(load_result, dict):
        v = load_result.get(name)
    return sorted(str(k) for k in v) if v is not None else None


def _as_dict(info):
    """transformers' loading info: a dict in 4.x; accept a dataclass / object too."""
    if info is None:
        return {}
    if isinstance(info, dict):
        return info
    import dataclasses
    if dataclasses.is_dataclass(info):
        return {f.name: getattr(info, f.name) for f in dataclasses.fields(info)}
    if hasattr(info, "__dict__"):
        return dict(vars(info))
    return {"repr": repr(info)}


def setup_torch(args):
    import torch
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = {}
    # fp32 must be true fp32 (no TF32) on the GPU: cuBLAS matmuls and cuDNN convolutions (the
    # vision patch embed is a Conv3d).  Only the legacy switches are used: torch >= 2.9 also has
    # the fp32_precision API, and setting both kinds makes later reads raise RuntimeError
    # ("mix of the legacy and new APIs", pytorch/pytorch#179445).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    for name, get in (("matmul.allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
                      ("cudnn.allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
                      ("matmul.allow_bf16_reduced_precision_reduction",
                       lambda: torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction),
                      ("float32_matmul_precision", torch.get_float32_matmul_precision),
                      ("deterministic_algorithms", torch.are_deterministic_algorithms_enabled),
                      ("num_threads", torch.get_num_threads)):
        try:
            flags[name] = get()
        except Exception as e:  # pragma: no cover
            flags[name] = "n/a (%s)" % type(e).__name__
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("twn_reference: --device cuda but torch.cuda.is_available() is False")
    return torch, flags


def versions(torch):
    import peft
    import safetensors
    import tokenizers
    import transformers
    v = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
         "transformers": transformers.__version__, "peft": peft.__version__,
         "tokenizers": tokenizers.__version__, "safetensors": getattr(safetensors, "__version__", "?")}
    try:
        import PIL
        v["pillow"] = PIL.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        v["cudnn"] = torch.backends.cudnn.version()
        v["gpu"] = torch.cuda.get_device_name()
    return v


def _grep_source(obj, needles):
    """'file:line: text' of the lines of obj's source that contain one of the needles."""
    try:
        fn = inspect.unwrap(obj)
        lines, start = inspect.getsourcelines(fn)
        path = inspect.getsourcefile(fn) or "?"
    except (TypeError, OSError) as e:
        return ["(source unavailable: %s)" % e]
    short = path
    for marker in ("/transformers/", "/peft/"):
        if marker in path:
            short = marker.strip("/") + "/" + path.split(marker, 1)[1]
    out = []
    for j, line in enumerate(lines):
        s = line.strip()
        if any(n in s for n in needles):
            out.append("%s:%d: %s" % (short, start + j, s))
    return out


def source_facts():
    """The lines of the installed transformers / peft that define the semantics the goldens rely
    on, found by content, so every golden says where they were on the machine that made it."""
    f = {}
    try:
        import transformers.models.qwen3_vl.modeling_qwen3_vl as M
        f["modeling_qwen3_vl"] = M.__file__
        f["Qwen3VLTextModel.forward"] = _grep_source(
            M.Qwen3VLTextModel.forward,
            ["@", "def forward", "self.norm(", "decoder_layer(", "_deepstack_process(", "position_ids[0]",
             "create_causal_mask(", "last_hidden_state="])
        f["Qwen3VLModel.forward"] = _grep_source(
            M.Qwen3VLModel.forward,
            ["@", "def forward", "get_input_embeddings()", "get_placeholder_mask(", "masked_scatter(",
             "if position_ids is None", "get_rope_index(", "self.language_model("])
        f["Qwen3VLForConditionalGeneration.forward"] = _grep_source(
            M.Qwen3VLForConditionalGeneration.forward,
            ["@", "def forward", "self.model(", "lm_head(", "hidden_states="])
        f["Qwen3VLTextRMSNorm.forward"] = _grep_source(M.Qwen3VLTextRMSNorm.forward, [""])
        f["Qwen3VLTextDecoderLayer.forward"] = _grep_source(M.Qwen3VLTextDecoderLayer.forward, ["return"])
        f["_can_record_outputs"] = {n: repr(getattr(getattr(M, n, None), "_can_record_outputs", None))
                                    for n in ("Qwen3VLPreTrainedModel", "Qwen3VLTextModel", "Qwen3VLModel",
                                              "Qwen3VLForConditionalGeneration")}
        f["get_rope_index.params"] = list(inspect.signature(M.Qwen3VLModel.get_rope_index).parameters)
        f["Qwen3VLModel.forward.params"] = list(inspect.signature(inspect.unwrap(M.Qwen3VLModel.forward)).parameters)
    except Exception as e:  # pragma: no cover
        f["qwen3_vl_error"] = repr(e)
    try:
        import transformers.utils.output_capturing as OC
        f["capture_outputs"] = _grep_source(OC.capture_outputs, ["tie_last_hidden_states", "last_hidden_state"])
        f["output_capturing_hook"] = _grep_source(OC.install_output_capuring_hook, ["append("])
    except Exception:
        try:
            import transformers.utils.generic as G
            f["check_model_inputs"] = _grep_source(G.check_model_inputs, ["tie_last_hidden_states", "last_hidden_state",
                                                                          "collected_outputs[key] +="])
        except Exception as e:  # pragma: no cover
            f["capture_error"] = repr(e)
    try:
        import peft.tuners.lora.layer as PL
        f["peft.LoraLayer.update_layer"] = _grep_source(PL.LoraLayer.update_layer, ["use_rslora", "scaling["])
        f["peft.Linear.forward"] = _grep_source(PL.Linear.forward, ["scaling", "lora_B(", "_cast_input_dtype",
                                                                    "result = result", "torch_result_dtype"])
    except Exception as e:  # pragma: no cover
        f["peft_error"] = repr(e)
    return f


# --------------------------------------------------------------------------------------------
# the engine

class _Capture:
    """Forward hooks on the decoder layers (input of layer 0, output of every layer) and on the
    final norm of the text model; with `visual`, also on the vision tower's patch_embed, blocks,
    DeepStack mergers and merger, recorded as "vis.patch_embed", "vis.block.<i>",
    "vis.deepstack.<k>", "vis.merger" (the names engine/vision.c's trace uses)."""

    def __init__(self, lm, visual=None):
        self.lm = lm
        self.visual = visual

    def __enter__(self):
        self.embed_in, self.layers, self.final, self.handles = None, [], [], []

        def layer_hook(idx):
            def f(mod, args, kwargs, out):
                if idx == 0 and self.embed_in is None:
                    x = args[0] if args else kwargs.get("hidden_states")
                    self.embed_in = x.detach().clone()
                o = out[0] if isinstance(out, (tuple, list)) else out
                self.layers.append((idx, o.detach().clone()))
            return f

        for i, layer in enumerate(self.lm.layers):
            self.handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
        self.handles.append(self.lm.norm.register_forward_hook(
            lambda mod, a, o: self.final.append(o.detach().clone())))
        self.vision = {}
        if self.visual is not None:
            def vis_hook(name):
                def f(mod, args, out):
                    o = out[0] if isinstance(out, (tuple, list)) else out
                    self.vision[name] = o.detach().clone()
                return f
            v = self.visual
            self.handles.append(v.patch_embed.register_forward_hook(vis_hook("vis.patch_embed")))
            for i, blk in enumerate(v.blocks):
                self.handles.append(blk.register_forward_hook(vis_hook("vis.block.%d" % i)))
            for k, mg in enumerate(v.deepstack_merger_list):
                self.handles.append(mg.register_forward_hook(vis_hook("vis.deepstack.%d" % k)))
            self.handles.append(v.merger.register_forward_hook(vis_hook("vis.merger")))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


class TorchEngine(C.Engine):
    def __init__(self, args, m, manifest_bytes, log):
        self.args, self.m, self.log = args, m, log
        self.torch, self.torch_flags = setup_torch(args)
        torch = self.torch
        self.device = torch.device(args.device)
        self.dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
        self.manifest_bytes = manifest_bytes
        self.checks = {"tokenizer_mismatch": [], "processor_mismatch": [], "rope_index": [],
                       "hidden_states_semantics": [], "final_is_norm_of_last_layer": [],
                       "logits_from_final": [], "kv_recheck": [], "active_adapter": []}
        self.failures = []
        self.report = {"manifest": m["_path"], "manifest_sha256": C.sha256_bytes(manifest_bytes),
                       "problems": [], "notes": []}
        self._processor = None
        self._auto_tok = None
        self._load()

    # ---------------------------------------------------------------- loading
    def _problem(self, msg):
        self.report["problems"].append(msg)

    def _load(self):
        torch = self.torch
        import safetensors.torch as st
        import tokenizers
        import transformers
        from transformers import Qwen3VLForConditionalGeneration
        m, R = self.m, self.report

        # --- base model
        kw = dict(attn_implementation=self.args.attn, output_loading_info=True, local_files_only=True)
        kw["dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"] = self.dtype
        logs = []
        with capture_logs(logs):
            res = Qwen3VLForConditionalGeneration.from_pretrained(m["_base"], **kw)
        model, info = res if isinstance(res, tuple) else (res, None)
        model.to(self.device).eval()
        li = {k: (sorted(str(x) for x in v) if isinstance(v, (list, set, tuple, frozenset)) else repr(v))
              for k, v in _as_dict(info).items()}
        if info is None:
            self._problem("base: from_pretrained(output_loading_info=True) returned no loading info")
        cfg = model.config
        tc = cfg.text_config
        R["base"] = {
            "dir": m["_base"], "class": type(model).__name__, "loading_info": li, "logs": logs,
            "attn_implementation": {"model": getattr(cfg, "_attn_implementation", None),
                                    "text": getattr(tc, "_attn_implementation", None),
                                    "vision": getattr(cfg.vision_config, "_attn_implementation", None)},
            "text_config": {k: getattr(tc, k, None) for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "hidden_act", "max_position_embeddings")},
            "rope": repr(getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None)),
            "tie_word_embeddings": getattr(cfg, "tie_word_embeddings", None),
            "vision_config": {k: getattr(cfg.vision_config, k, None) for k in (
                "depth", "hidden_size", "num_heads", "patch_size", "spatial_merge_size", "out_hidden_size",
                "deepstack_visual_indexes")},
            "image_token_id": cfg.image_token_id,
        }
        for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            if li.get(k):
                self._problem("base: loading_info.%s = %s" % (k, li[k]))
        R["base"]["file_check"] = self._check_base_files(model, st)
        self.H = tc.hidden_size
        self.n_layers = tc.num_hidden_layers
        self.vocab_rows = tc.vocab_size
        self.image_token_id = cfg.image_token_id
        self.merge = cfg.vision_config.spatial_merge_size

        # --- adapters (reasoning first, as PeftModel; embedding via load_adapter)
        from peft import PeftModel
        R["adapters"] = {}
        logs_r, logs_e = [], []
        with capture_logs(logs_r):
            pm = PeftModel.from_pretrained(model, m["_reasoning"], adapter_name="reasoning", is_trainable=False)
        with capture_logs(logs_e):
            res_e = pm.load_adapter(m["_embedding"], adapter_name="embedding", is_trainable=False)
        pm.eval()
        self.pm = pm
        self.hf = pm.get_base_model()
        self.lm = self.hf.model.language_model
        for name, d, logs_, res in (("reasoning", m["_reasoning"], logs_r, None),
                                    ("embedding", m["_embedding"], logs_e, res_e)):
            R["adapters"][name] = self._check_adapter(name, d, logs_, res, st)

        # --- gate
        gsd = torch.load(m["_gate"], map_location="cpu", weights_only=True)
        if not isinstance(gsd, dict) or not all(isinstance(v, torch.Tensor) for v in gsd.values()):
            raise SystemExit("%s: expected a state_dict of tensors, got %s" % (m["_gate"], type(gsd).__name__))
        layers = C.parse_gate_state_dict({k: tuple(v.shape) for k, v in gsd.items()}, hidden=self.H)
        act = {"gelu": lambda: torch.nn.GELU(), "gelu_tanh": lambda: torch.nn.GELU(approximate="tanh"),
               "relu": lambda: torch.nn.ReLU(), "silu": lambda: torch.nn.SiLU(),
               "tanh": lambda: torch.nn.Tanh()}[m["gate"]["activation"]]
        mods, remap = [], {}
        for j, L in enumerate(layers):
            lin = torch.nn.Linear(L["in"], L["out"], bias=L["bias"] is not None)
            remap["%d.weight" % len(mods)] = gsd[L["weight"]].detach().float()
            if L["bias"] is not None:
                remap["%d.bias" % len(mods)] = gsd[L["bias"]].detach().float()
            mods.append(lin)
            if j + 1 < len(layers):
                mods.append(act())
        gate = torch.nn.Sequential(*mods)
        gate.load_state_dict(remap, strict=True)
        self.gate_mlp = gate.float().to(self.device).eval()
        R["gate"] = {"path": m["_gate"], "keys": {k: list(v.shape) for k, v in gsd.items()},
                     "dtypes": sorted({str(v.dtype) for v in gsd.values()}), "layers": layers,
                     "activation": m["gate"]["activation"], "input": m["gate"]["input"],
                     "module": repr(self.gate_mlp), "pt_zip": C.pt_zip_facts(m["_gate"])}
        try:  # the torch-free reader (the C reader's whitelist) must see the same shapes
            light = {k: list(v[1]) for k, v in C.pt_shapes(m["_gate"]).items()}
            R["gate"]["pt_shapes_agree"] = light == R["gate"]["keys"]
        except Exception as e:
            R["gate"]["pt_shapes_agree"] = "error: %r" % e
        if R["gate"]["pt_shapes_agree"] is not True:
            R["notes"].append("gate: the restricted .pt reader disagrees with torch.load: %s" % R["gate"]["pt_shapes_agree"])
        if any(L["bias"] is None for L in layers):
            R["notes"].append("gate: a layer has no bias")

        # --- queries
        q = torch.load(m["_queries"], map_location="cpu", weights_only=True)
        form = "tensor"
        if isinstance(q, dict):
            if len(q) != 1:
                raise SystemExit("%s: a dict must hold exactly one tensor (has %d)" % (m["_queries"], len(q)))
            form = "dict[%r]" % next(iter(q))
            q = next(iter(q.values()))
        if not isinstance(q, torch.Tensor) or q.dim() != 2 or q.shape[1] != self.H or q.shape[0] < 1:
            raise SystemExit("%s: expected a tensor [K, %d], got %s" % (
                m["_queries"], self.H, list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__))
        R["queries"] = {"path": m["_queries"], "form": form, "shape": list(q.shape), "dtype": str(q.dtype),
                        "pt_zip": C.pt_zip_facts(m["_queries"])}
        self.queries = q.detach().to(device=self.device, dtype=self.dtype)
        self.n_queries = q.shape[0]

        # --- tokenizer
        tok_path = os.path.join(m["_base"], "tokenizer.json")
        self.tok = tokenizers.Tokenizer.from_file(tok_path)
        self.table = C.TokenTable.from_file(tok_path)
        R["tokenizer"] = {"path": tok_path, "sha256": C.sha256_file(tok_path),
                          "vocab": len(self.table.vocab), "added": len(self.table.added),
                          "size": self.table.size(), "embedding_rows": self.vocab_rows}
        if self.table.size() > self.vocab_rows:
            self._problem("tokenizer has %d ids but the embedding only %d rows" % (self.table.size(), self.vocab_rows))
        try:
            from transformers import AutoTokenizer
            with capture_logs(R["tokenizer"].setdefault("auto_logs", [])):
                self._auto_tok = AutoTokenizer.from_pretrained(m["_base"], local_files_only=True)
            R["tokenizer"]["auto_class"] = type(self._auto_tok).__name__
        except Exception as e:
            R["tokenizer"]["auto_error"] = repr(e)
            R["notes"].append("AutoTokenizer failed to load; tokenizer cross-check skipped: %r" % e)
        self.lora_modules = [(n, mod) for n, mod in self.hf.named_modules()
                             if hasattr(mod, "lora_A") and hasattr(mod, "active_adapters")]

    def _check_base_files(self, model, st):
        """Every tensor of base/*.safetensors is a model tensor with identical values (after the
        cast to the model dtype); every model tensor comes from the file (tied lm_head excepted)."""
        torch = self.torch
        from safetensors import safe_open
        base = self.m["_base"]
        idx = os.path.join(base, "model.safetensors.index.json")
        if os.path.exists(idx):
            with open(idx) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        sd = model.state_dict()
        seen, not_in_model, mismatched = set(), [], []
        for fn in files:
            with safe_open(os.path.join(base, fn), framework="pt", device="cpu") as sf:
                for k in sf.keys():
                    seen.add(k)
                    if k not in sd:
                        not_in_model.append(k)
                        continue
                    t = sf.get_tensor(k)
                    p = sd[k].detach().cpu()
                    if tuple(t.shape) != tuple(p.shape) or not torch.equal(t.to(p.dtype), p):
                        mismatched.append(k)
        not_in_file = [k for k in sd if k not in seen]
        tied = []
        if "lm_head.weight" in not_in_file:
            emb = model.get_input_embeddings().weight
            if model.lm_head.weight.data_ptr() == emb.data_ptr():
                not_in_file.remove("lm_head.weight")
                tied.append("lm_head.weight")
        out = {"files": files, "n_file_tensors": len(seen), "n_model_tensors": len(sd),
               "not_in_model": sorted(not_in_model), "not_in_file": sorted(not_in_file),
               "value_mismatch": sorted(mismatched), "tied": tied,
               "lm_head_tied": model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()}
        for k in ("not_in_model", "not_in_file", "value_mismatch"):
            if out[k]:
                self._problem("base file check: %s = %s" % (k, out[k][:20]))
        return out

    def _check_adapter(self, name, d, logs, load_result, st):
        torch = self.torch
        with open(os.path.join(d, "adapter_config.json")) as f:
            acfg = json.load(f)
        fpath = os.path.join(d, "adapter_model.safetensors")
        if os.path.exists(fpath):
            ftensors = st.load_file(fpath)
        else:
            fpath = os.path.join(d, "adapter_model.bin")
            ftensors = torch.load(fpath, map_location="cpu", weights_only=True)
        from peft import get_peft_model_state_dict
        try:
            msd = get_peft_model_state_dict(self.pm, adapter_name=name, save_embedding_layers=False)
        except TypeError:
            msd = get_peft_model_state_dict(self.pm, adapter_name=name)
        fk, mk = set(ftensors), set(msd)
        mism, maxdiff = [], 0.0
        for k in sorted(fk & mk):
            a, b = ftensors[k], msd[k].detach().cpu()
            if tuple(a.shape) != tuple(b.shape):
                mism.append(k)
                continue
            diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
            maxdiff = max(maxdiff, diff)
            if diff != 0.0 and a.dtype == b.dtype:
                mism.append(k)
        scalings, dtypes, n_mod, b_nonzero = set(), set(), 0, False
        for mn, mod in self.hf.named_modules():
            la = getattr(mod, "lora_A", None)
            lea = getattr(mod, "lora_embedding_A", None)
            if la is not None and hasattr(la, "keys") and name in la.keys():
                a_w, b_w = la[name].weight, mod.lora_B[name].weight
            elif lea is not None and hasattr(lea, "keys") and name in lea.keys():
                a_w, b_w = lea[name], mod.lora_embedding_B[name]
            else:
                continue
            n_mod += 1
            scalings.add(round(float(mod.scaling[name]), 9))
            dtypes.add(str(a_w.dtype))
            if b_w.detach().abs().max().item() > 0:
                b_nonzero = True
        r, alpha = acfg.get("r"), acfg.get("lora_alpha")
        expected = None
        if isinstance(r, int) and r > 0 and isinstance(alpha, (int, float)):
            expected = round(alpha / (r ** 0.5) if acfg.get("use_rslora") else alpha / r, 9)
        out = {"dir": d, "config": acfg, "file": fpath, "n_file_tensors": len(fk),
               "file_dtypes": sorted({str(t.dtype) for t in ftensors.values()}),
               "missing_in_file": sorted(mk - fk), "unexpected_in_file": sorted(fk - mk),
               "value_mismatch": mism, "max_abs_diff_file_vs_model": maxdiff,
               "peft_load_result": None if load_result is None else {
                   "missing_keys": _keys_of(load_result, "missing_keys"),
                   "unexpected_keys": _keys_of(load_result, "unexpected_keys")},
               "lora_modules": n_mod, "lora_param_dtypes": sorted(dtypes), "scalings": sorted(scalings),
               "expected_scaling": expected, "lora_B_nonzero": b_nonzero, "logs": logs}
        if out["missing_in_file"] or out["unexpected_in_file"] or mism:
            self._problem("adapter %s: missing_in_file=%s unexpected_in_file=%s value_mismatch=%s" % (
                name, out["missing_in_file"][:10], out["unexpected_in_file"][:10], mism[:10]))
        pl = out["peft_load_result"]
        if pl and (pl["missing_keys"] or pl["unexpected_keys"]):
            # older peft lists every model key not in the file (base weights, the other adapter);
            # only this adapter's LoRA tensors count
            lora_missing = [k for k in (pl["missing_keys"] or [])
                            if "lora_" in k and ("." + name + "." in k or k.endswith("." + name))]
            if lora_missing or pl["unexpected_keys"]:
                self._problem("adapter %s: peft load_adapter reported missing=%s unexpected=%s" % (
                    name, lora_missing[:10], (pl["unexpected_keys"] or [])[:10]))
        for line in logs:
            low = line.lower()
            if "missing adapter keys" in low or "unexpected keys" in low or "unexpected adapter keys" in low:
                self._problem("adapter %s: %s" % (name, line))
        if n_mod == 0:
            self._problem("adapter %s: no LoRA module in the model" % name)
        if expected is not None and not acfg.get("rank_pattern") and not acfg.get("alpha_pattern") and \
                scalings and scalings != {expected}:
            self._problem("adapter %s: scalings %s != expected %s" % (name, sorted(scalings), expected))
        if not b_nonzero:
            self.report["notes"].append("adapter %s: every lora_B is zero (the adapter is a no-op)" % name)
        return out

    # ---------------------------------------------------------------- tokenization
    def _encode(self, text):
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self._auto_tok is not None:
            ids2 = self._auto_tok(text, add_special_tokens=False)["input_ids"]
            if list(ids2) != list(ids):
                self.checks["tokenizer_mismatch"].append({"text": text, "tokenizers": ids, "auto": list(ids2)})
                self.failures.append("tokenizer: tokenizers and AutoTokenizer disagree on %r" % text[:60])
        bad = [i for i in ids if i >= self.vocab_rows]
        if bad:
            raise SystemExit("token ids %s are beyond the embedding (%d rows)" % (bad[:5], self.vocab_rows))
        return ids

    def _proc(self):
        if self._processor is None:
            from transformers import AutoProcessor
            logs = []
            with capture_logs(logs):
                self._processor = AutoProcessor.from_pretrained(self.m["_base"], local_files_only=True)
            self.report["processor"] = {"class": type(self._processor).__name__,
                                        "image_processor": type(self._processor.image_processor).__name__,
                                        "logs": logs}
        return self._processor

    def tokenize(self, text, image_paths):
        if not image_paths:
            return self._encode(text), None
        # Images (part 2, not yet exercised by make_goldens.sh): the processor expands each
        # <|image_pad|> to t*h*w/merge^2 copies and makes pixel_values; spec §2.5 / §6.2.
        from PIL import Image
        proc = self._proc()
        imgs = []
        for p in image_paths:
            with Image.open(p) as im:
                im.load()
                imgs.append(im.copy())
        enc = proc(text=[text], images=imgs, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        grids = enc["image_grid_thw"].tolist()
        counts = [t * h * w // (self.merge ** 2) for t, h, w in grids]
        mine = C.expand_image_pads(self._encode(text), self.image_token_id, counts)
        if mine != ids:
            self.checks["processor_mismatch"].append({"text": text, "processor": ids, "tokenizer": mine})
            self.failures.append("processor ids differ from tokenizer ids + pad expansion for %r" % text[:60])
        vision = {"grids": grids, "pixel_values": enc["pixel_values"]}
        return ids, vision

    def token_bytes(self, i):
        return self.table.token_bytes(i)

    def token_id(self, text):
        return self.table.token_id(text)

    # ---------------------------------------------------------------- passes
    def _set_adapter(self, name):
        self.pm.set_adapter(name)
        act = self.pm.active_adapters if hasattr(self.pm, "active_adapters") else [self.pm.active_adapter]
        act = [act] if isinstance(act, str) else list(act)
        bad = []
        for n, mod in self.lora_modules:
            a = mod.active_adapters
            a = [a] if isinstance(a, str) else list(a)
            if a != [name]:
                bad.append(n)
        if act != [name] or bad:
            self.checks["active_adapter"].append({"want": name, "model": act, "layers": bad[:5]})
            raise SystemExit("set_adapter(%r) left active=%s, layers %s" % (name, act, bad[:5]))

    def _vision_kwargs(self, vision):
        torch = self.torch
        if vision is None:
            return {}
        return {"pixel_values": vision["pixel_values"].to(self.device),
                "image_grid_thw": torch.tensor(vision["grids"], dtype=torch.long, device=self.device)}

    def _check_rope_index(self, ids, vision, positions):
        torch = self.torch
        fn = self.hf.model.get_rope_index
        params = inspect.signature(fn).parameters
        ids_t = torch.tensor([ids], dtype=torch.long, device=self.device)
        kw = {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)}
        if "image_grid_thw" in params:
            kw["image_grid_thw"] = torch.tensor(vision["grids"], dtype=torch.long, device=self.device)
        if "mm_token_type_ids" in params:
            kw["mm_token_type_ids"] = (ids_t == self.image_token_id).int()
        try:
            got = fn(**kw)
            got = got[0] if isinstance(got, tuple) else got
            ok = got[:, 0, :].tolist() == [row[:len(ids)] for row in positions]
            self.checks["rope_index"].append({"n": len(ids), "equal": ok})
            if not ok:
                self.failures.append("get_rope_index differs from the port (mrope_positions)")
        except Exception as e:
            self.checks["rope_index"].append({"n": len(ids), "error": repr(e)})

    def _record(self, cap, out, n_ids, want_hs):
        """{name: tensor on CPU} of a pass, plus consistency checks against the model output."""
        torch = self.torch
        L = self.n_layers
        idxs = [i for i, _ in cap.layers]
        if idxs != list(range(L)) or len(cap.final) != 1 or cap.embed_in is None:
            raise SystemExit("hooks saw layers %s and %d final-norm calls; expected 0..%d once each" % (
                idxs, len(cap.final), L - 1))
        layers = [t[0] for _, t in cap.layers]
        final = cap.final[0][0]
        rec = {"hidden.embed": cap.embed_in[0]}
        for i, t in enumerate(layers):
            rec["hidden.layer%d" % i] = t
        rec["final"] = final
        rec.update(cap.vision)
        logits_last = out.logits[0, n_ids - 1]
        rec["logits_last"] = logits_last
        # final == norm(last layer output): nothing happens between the last layer and the norm.
        # Same op on the same input: expected bit-identical; a failure only past a tolerance.
        tol = 1e-5 if self.dtype == torch.float32 else 1e-2
        renorm = self.lm.norm(layers[-1].unsqueeze(0))[0]
        d = (renorm.float() - final.float()).abs().max().item()
        self.checks["final_is_norm_of_last_layer"].append(d)
        if d > tol * max(1.0, final.float().abs().max().item()):
            self.failures.append("final-norm output != norm(last layer output) (max diff %g)" % d)
        # logits == lm_head(final row) (a 1-row GEMM may round differently from the T-row one)
        relog = self.hf.lm_head(final[n_ids - 1:n_ids])[0]
        d = (relog.float() - logits_last.float()).abs().max().item()
        self.checks["logits_from_final"].append(d)
        if d > tol * max(1.0, logits_last.float().abs().max().item()):
            self.failures.append("logits differ from lm_head(final) by %g" % d)
        if want_hs:
            self.checks["hidden_states_semantics"].append(self._hs_semantics(out, cap, layers, final))
        return rec

    def _hs_semantics(self, out, cap, layers, final):
        torch = self.torch
        hs = getattr(out, "hidden_states", None)
        if not hs:
            return {"hidden_states": "absent"}
        hs = [h[0] for h in hs]
        L = len(layers)
        last = hs[-1]
        if torch.equal(last, final):
            last_kind = "post_norm (= final norm output)"
        elif torch.equal(last, layers[-1]):
            last_kind = "pre_norm (= output of the last decoder layer)"
        else:
            last_kind = "other"
        mid = [k for k in range(1, min(len(hs) - 1, L)) if not torch.equal(hs[k], layers[k - 1])]
        return {"len": len(hs), "n_layers": L, "first_is_layer0_input": bool(torch.equal(hs[0], cap.embed_in[0])),
                "last": last_kind, "middle_mismatch": mid}

    def embed_pass(self, ids, vision, positions, rows):
        torch = self.torch
        self._set_adapter("embedding")
        with torch.no_grad():
            ids_t = torch.tensor([ids], dtype=torch.long, device=self.device)
            emb = self.hf.get_input_embeddings()(ids_t)
            inp = torch.cat([emb, self.queries.unsqueeze(0).to(emb.dtype)], dim=1)
            T = inp.shape[1]
            pos = torch.tensor(positions, dtype=torch.long, device=self.device).view(3, 1, T)
            mask = torch.ones(1, T, dtype=torch.long, device=self.device)
            if vision is not None:
                self._check_rope_index(ids, vision, positions)
            with _Capture(self.lm, self.hf.model.visual if vision is not None else None) as cap:
                out = self.hf(inputs_embeds=inp, attention_mask=mask, position_ids=pos, use_cache=False,
                              output_hidden_states=True, return_dict=True, **self._vision_kwargs(vision))
            rec = self._record(cap, out, len(ids), want_hs=True)
            pooled = rec["final"][rows].float().mean(dim=0)
        return pooled.cpu(), {k: v.detach().cpu() for k, v in rec.items()}

    def gate(self, e):
        torch = self.torch
        with torch.no_grad():
            x = e.float().to(self.device)
            if self.m["gate"]["input"] == "pooled_normalized":
                x = x / x.norm().clamp_min(1e-12)
            logit = self.gate_mlp(x.unsqueeze(0))[0, 0]
            p = torch.sigmoid(logit)
        return float(logit), float(p)

    def normalize(self, e):
        torch = self.torch
        with torch.no_grad():
            x = e.float()
            return (x / x.norm().clamp_min(1e-12)).cpu()

    def reason_prefill(self, ids, vision, positions):
        torch = self.torch
        self._set_adapter("reasoning")
        with torch.no_grad():
            ids_t = torch.tensor([ids], dtype=torch.long, device=self.device)
            pos = torch.tensor(positions, dtype=torch.long, device=self.device).view(3, 1, len(ids))
            mask = torch.ones(1, len(ids), dtype=torch.long, device=self.device)
            with _Capture(self.lm, self.hf.model.visual if vision is not None else None) as cap:
                out = self.hf(input_ids=ids_t, attention_mask=mask, position_ids=pos, use_cache=True,
                              return_dict=True, **self._vision_kwargs(vision))
            rec = self._record(cap, out, len(ids), want_hs=False)
        state = {"cache": out.past_key_values, "logits": out.logits[0, -1], "n": len(ids), "ids": list(ids),
                 "vision": vision, "positions": positions, "fed_positions": []}
        return state, {k: v.detach().cpu() for k, v in rec.items()}

    def reason_step(self, state, prev, position):
        torch = self.torch
        with torch.no_grad():
            if prev is not None:
                state["n"] += 1
                state["fed_positions"].append(position)
                out = self.hf(input_ids=torch.tensor([[prev]], dtype=torch.long, device=self.device),
                              attention_mask=torch.ones(1, state["n"], dtype=torch.long, device=self.device),
                              position_ids=torch.full((3, 1, 1), position, dtype=torch.long, device=self.device),
                              past_key_values=state["cache"], use_cache=True, return_dict=True)
                state["cache"] = out.past_key_values
                state["logits"] = out.logits[0, -1]
            lg = state["logits"]
            tok = int(torch.argmax(lg).item())  # first maximal index on ties
            top2 = torch.topk(lg.float(), 2).values
            margin = float((top2[0] - top2[1]).item())
        return tok, margin

    def finish_reason(self, state, gen):
        """No-cache forward over prompt + the fed CoT tokens: its argmax per position must give the
        same tokens as the KV-cache loop (a near-tie may flip; the margins say which)."""
        torch = self.torch
        state["cache"] = None
        if self.args.no_recheck or not gen:
            return {}
        fed = gen[:-1]
        full = state["ids"] + fed
        P = state["positions"]
        pos = [row + list(state["fed_positions"]) for row in P]
        with torch.no_grad():
            ids_t = torch.tensor([full], dtype=torch.long, device=self.device)
            kw = dict(input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
                      position_ids=torch.tensor(pos, dtype=torch.long, device=self.device).view(3, 1, len(full)),
                      use_cache=False, return_dict=True)
            kw.update(self._vision_kwargs(state["vision"]))
            if "logits_to_keep" in inspect.signature(inspect.unwrap(type(self.hf).forward)).parameters:
                kw["logits_to_keep"] = len(gen)
            out = self.hf(**kw)
            lg = out.logits[0, -len(gen):]
            again = lg.argmax(dim=-1).tolist()
            top2 = torch.topk(lg.float(), 2, dim=-1).values
            margins = (top2[:, 0] - top2[:, 1]).tolist()
        diff = [k for k in range(len(gen)) if again[k] != gen[k]]
        entry = {"n": len(gen), "mismatch_steps": diff[:20],
                 "mismatch_margins": [margins[k] for k in diff[:20]]}
        self.checks["kv_recheck"].append(entry)
        tol = 1e-4 if self.dtype == torch.float32 else 0.25
        real = [k for k in diff if margins[k] > tol]
        if real:
            self.failures.append("KV-cache decode differs from the no-cache forward at step %d "
                                 "(no-cache margin %g)" % (real[0], margins[real[0]]))
        return {"cot_recheck_ids": again}

    # ---------------------------------------------------------------- report / metadata
    def print_report(self, out=sys.stdout):
        R = self.report
        w = out.write
        w("manifest  %s (sha256 %s)\n" % (R["manifest"], R["manifest_sha256"]))
        b = R["base"]
        w("base      %s  %s\n" % (b["dir"], b["class"]))
        w("          text %s\n" % json.dumps(b["text_config"]))
        w("          rope %s  tie_word_embeddings %s\n" % (b["rope"], b["tie_word_embeddings"]))
        w("          vision %s\n" % json.dumps(b["vision_config"]))
        w("          attn %s\n" % json.dumps(b["attn_implementation"]))
        w("          loading_info %s\n" % json.dumps(b["loading_info"]))
        fc = b["file_check"]
        w("          file check: %d file tensors, %d model tensors, not_in_model %s, not_in_file %s, "
          "value_mismatch %s, tied %s\n" % (fc["n_file_tensors"], fc["n_model_tensors"], fc["not_in_model"],
                                            fc["not_in_file"], fc["value_mismatch"], fc["tied"]))
        for name, a in R["adapters"].items():
            c = a["config"]
            w("adapter   %-9s r=%s alpha=%s rslora=%s targets=%s dropout=%s task=%s\n" % (
                name, c.get("r"), c.get("lora_alpha"), c.get("use_rslora"), c.get("target_modules"),
                c.get("lora_dropout"), c.get("task_type")))
            w("          %d file tensors (%s), %d LoRA modules (%s), scalings %s (expected %s), B nonzero %s\n" % (
                a["n_file_tensors"], ",".join(a["file_dtypes"]), a["lora_modules"], ",".join(a["lora_param_dtypes"]),
                a["scalings"], a["expected_scaling"], a["lora_B_nonzero"]))
            w("          missing_in_file %s  unexpected_in_file %s  value_mismatch %s  peft load result %s\n" % (
                a["missing_in_file"], a["unexpected_in_file"], a["value_mismatch"], a["peft_load_result"]))
        g = R["gate"]
        w("gate      %s: %s  dtypes %s  activation %s  input %s\n" % (
            g["path"], json.dumps(g["keys"]), g["dtypes"], g["activation"], g["input"]))
        w("          zip: all_stored %s  data_records_aligned64 %s  data.pkl %s\n" % (
            g["pt_zip"].get("all_stored"), g["pt_zip"].get("data_records_aligned64"), g["pt_zip"].get("data_pkl")))
        q = R["queries"]
        w("queries   %s: %s %s %s  zip: all_stored %s aligned64 %s\n" % (
            q["path"], q["form"], q["shape"], q["dtype"], q["pt_zip"].get("all_stored"),
            q["pt_zip"].get("data_records_aligned64")))
        t = R["tokenizer"]
        w("tokenizer %s: vocab %d + added %d -> %d ids, embedding rows %d, AutoTokenizer %s\n" % (
            t["path"], t["vocab"], t["added"], t["size"], t["embedding_rows"], t.get("auto_class", t.get("auto_error"))))
        if R.get("smoke"):
            w("smoke     %s\n" % json.dumps(R["smoke"]))
        logs = [x for x in b["logs"]] + [x for a in R["adapters"].values() for x in a["logs"]]
        for line in logs:
            w("log       %s\n" % line)
        for n in R["notes"]:
            w("note      %s\n" % n)
        for p in R["problems"]:
            w("PROBLEM   %s\n" % p)
        w("load: %s\n" % ("OK, no missing or unexpected keys" if not R["problems"] else
                          "%d problem(s)" % len(R["problems"])))

    def smoke(self):
        """Adapters switch and change the output: final hidden state of a short prompt with no
        adapter, the embedding adapter and the reasoning adapter."""
        torch = self.torch
        ids = self._encode("<|im_start|>user\nHello world<|im_end|>\n")
        ids_t = torch.tensor([ids], dtype=torch.long, device=self.device)
        res = {}

        def run():
            with torch.no_grad(), _Capture(self.lm) as cap:
                self.hf(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), use_cache=False)
            return cap.final[0][0].float()

        with self.pm.disable_adapter():
            base = run()
        self._set_adapter("embedding")
        e = run()
        self._set_adapter("reasoning")
        r = run()
        res["max|embedding-base|"] = (e - base).abs().max().item()
        res["max|reasoning-base|"] = (r - base).abs().max().item()
        res["max|embedding-reasoning|"] = (e - r).abs().max().item()
        self.report["smoke"] = res
        for k, v in res.items():
            if v == 0.0:
                self._problem("smoke: %s is 0 (an adapter has no effect or set_adapter does not switch)" % k)


# --------------------------------------------------------------------------------------------
# saving

def to_tensor(torch, v):
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().contiguous()
    if isinstance(v, bool):
        return torch.tensor([int(v)], dtype=torch.int64)
    if isinstance(v, int):
        return torch.tensor([v], dtype=torch.int64)
    if isinstance(v, float):
        return torch.tensor([v], dtype=torch.float32)
    if isinstance(v, list):
        flat = v
        while flat and isinstance(flat[0], list):
            flat = [x for row in flat for x in row]
        if all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
            return torch.tensor(v, dtype=torch.int64) if v else torch.zeros(0, dtype=torch.int64)
        return torch.tensor(v, dtype=torch.float32)
    raise TypeError("cannot store %r" % type(v))


_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def save_golden(torch, path, tensors, meta, log):
    """safetensors.torch.save_file; if it refuses (older safetensors rejected several
    zero-element tensors as "shared"), the same format written by twn_ref_common."""
    from safetensors.torch import save_file
    try:
        save_file(tensors, path, metadata=meta)
        return
    except Exception as e:
        log("safetensors.torch.save_file failed (%r); writing with the fallback writer" % e)
    entries = []
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        dt = _ST_DTYPES[str(t.dtype).replace("torch.", "")]
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        entries.append((k, dt, list(t.shape), data))
    with open(path, "wb") as f:
        f.write(C.safetensors_serialize(entries, meta))


def write_stop_probe(path, m, raw_bytes, T, summary, table, log):
    """A copy of the manifest with one more stop string, taken from the first long CoT."""
    for i, s in enumerate(summary):
        if not s.get("route") or s.get("stop_reason") != "max_tokens" or s.get("n_gen", 0) < 6:
            continue
        pick = C.pick_stop_probe(T["item.%d.cot_gen_ids" % i], table.token_bytes, existing=m["stop"])
        if pick:
            probe, cut = pick
            break
    else:
        log("stop probe: no hard item with a long enough CoT; %s not written" % path)
        return False
    data = json.loads(raw_bytes.decode("utf-8"))
    stops = list(data.get("stop", C.MANIFEST_DEFAULTS["stop"])) + [probe]
    if len(stops) > C.MAX_STOPS:
        stops = stops[-C.MAX_STOPS:]
    data["stop"] = stops
    nd = os.path.dirname(os.path.abspath(path))
    data["base"] = os.path.relpath(m["_base"], nd)
    data.setdefault("adapters", {})
    data["adapters"]["embedding"] = os.path.relpath(m["_embedding"], nd)
    data["adapters"]["reasoning"] = os.path.relpath(m["_reasoning"], nd)
    data.setdefault("gate", {})
    data["gate"]["path"] = os.path.relpath(m["_gate"], nd)
    data["queries"] = os.path.relpath(m["_queries"], nd)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")
    log("stop probe: item %s, stop %r (expected CoT length %d in that item) -> %s" % (
        summary[i]["id"], probe, cut, path))
    return True


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()

    def log(msg):
        if not args.quiet:
            sys.stderr.write("[twn_reference %6.1fs] %s\n" % (time.time() - t0, msg))

    m, raw = C.load_manifest(args.model)
    eng = TorchEngine(args, m, raw, log)
    torch = eng.torch
    if args.check_load_only:
        eng.smoke()
    if args.check_load_only or args.report_json:
        if args.report_json:
            with open(args.report_json, "w") as f:
                json.dump(eng.report, f, indent=2, default=str)
    if args.check_load_only:
        eng.print_report()
        return 0 if not eng.report["problems"] else 1
    if eng.report["problems"]:
        eng.print_report(sys.stderr)
        if not args.allow_load_problems:
            sys.stderr.write("twn_reference: load problems (see above); --allow-load-problems to run anyway\n")
            return 1
    items = C.read_items(args.items)
    log("%d items, mode %s, %s on %s, attn %s" % (len(items), args.mode, args.dtype, args.device, args.attn))
    T, summary = C.run_twn(eng, m, items, args.mode, args.budget_window or None, log)
    tensors = {k: to_tensor(torch, v) for k, v in T.items()}
    vers = versions(torch)
    meta = {
        "format": GOLDEN_FORMAT,
        "versions": json.dumps(vers, sort_keys=True),
        "torch": vers["torch"], "transformers": vers["transformers"], "peft": vers["peft"],
        "tokenizers": vers["tokenizers"],
        "dtype": args.dtype, "device": args.device, "attn": args.attn, "mode": args.mode,
        "budget_window": str(args.budget_window),
        "torch_flags": json.dumps(eng.torch_flags, sort_keys=True, default=str),
        "manifest_path": m["_path"], "manifest_sha256": C.sha256_bytes(raw),
        "manifest": raw.decode("utf-8"),
        "effective_manifest": json.dumps(C.public_manifest(m), sort_keys=True, ensure_ascii=False),
        "model_files_sha256": json.dumps(C.checkpoint_sha256(m), sort_keys=True),
        "items": json.dumps([it["id"] for it in items], ensure_ascii=False),
        "items_sha256": C.sha256_file(args.items),
        "n_items": str(len(items)),
        "n_layers": str(eng.n_layers), "hidden_size": str(eng.H), "n_queries": str(eng.n_queries),
        "summary": json.dumps(summary, ensure_ascii=False, default=str),
        "checks": json.dumps(eng.checks, default=str),
        "failures": json.dumps(eng.failures),
        "source_facts": json.dumps(source_facts(), default=str),
        "load_report": json.dumps(eng.report, default=str),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_golden(torch, args.out, tensors, meta, log)
    side = os.path.splitext(args.out)[0] + ".summary.json"
    with open(side, "w", encoding="utf-8") as f:
        json.dump({"metadata": {k: v for k, v in meta.items() if k not in ("load_report", "manifest")},
                   "summary": summary,
                   "tensors": {k: [str(t.dtype).replace("torch.", ""), list(t.shape)] for k, t in tensors.items()}},
                  f, ensure_ascii=False, indent=1, default=str)
    log("wrote %s (%d tensors) and %s" % (args.out, len(tensors), side))
    hs = {json.dumps(x, sort_keys=True) for x in eng.checks["hidden_states_semantics"]}
    log("output_hidden_states semantics seen: %s" % "; ".join(sorted(hs)))
    if args.stop_probe_manifest:
        write_stop_probe(args.stop_probe_manifest, m, raw, T, summary, eng.table, log)
    if eng.failures:
        sys.stderr.write("twn_reference: %d check failure(s):\n  %s\n" % (
            len(eng.failures), "\n  ".join(sorted(set(eng.failures)))))
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
