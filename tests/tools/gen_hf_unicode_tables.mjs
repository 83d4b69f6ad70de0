// gen_hf_unicode_tables.mjs — derives the Unicode tables in engine/tokenizer_unicode.c from the
// real Hugging Face `tokenizers` (Rust, via its npm binding) so the C tokenizer can reproduce
// what HF does where the C libraries' Unicode data differ from HF's:
//   * the regex classes \s, \p{L}, \p{N} as HF's Oniguruma sees them (PCRE2 10.42 is Unicode 14;
//     onig in tokenizers 0.23 is Unicode 16, and its \s is not PCRE2's \s);
//   * the code points where HF's NFC (crate unicode-normalization-alignments, old Unicode tables)
//     does nothing while a modern NFC (utf8proc, ICU) reorders or composes.
// Usage: node gen_hf_unicode_tables.mjs NODE_MODULES_WITH_tokenizers PCRE2_L_N_JSON
//   PCRE2_L_N_JSON: {"L":[cps],"N":[cps]} as PCRE2 matches \p{L} / \p{N} (optional: without it
//   the full HF classes are printed instead of the extras).
// Not run by the build; rerun when HF or the C libraries move to a new Unicode version.
import { createRequire } from "module";
import fs from "fs";
const require = createRequire(process.argv[2].replace(/\/?$/, "/"));
const { Tokenizer } = require("tokenizers");

function splitter(re) {
  const j = {
    version: "1.0", truncation: null, padding: null, added_tokens: [], normalizer: null,
    pre_tokenizer: { type: "Split", pattern: { Regex: re }, behavior: "Removed", invert: false },
    post_processor: null, decoder: null,
    model: { type: "BPE", dropout: null, unk_token: null, continuing_subword_prefix: null,
             end_of_word_suffix: null, fuse_unk: false, byte_fallback: false,
             ignore_merges: false, vocab: { a: 0 }, merges: [] },
  };
  return Tokenizer.fromString(JSON.stringify(j)).getPreTokenizer();
}
const allCps = [];
for (let c = 0; c < 0x110000; c++) if (c < 0xd800 || c >= 0xe000) allCps.push(c);

function hfClass(re) {
  const pt = splitter(re), matched = [];
  for (let i = 0; i < allCps.length; i += 4096) {
    const cps = allCps.slice(i, i + 4096);
    const kept = new Set();
    for (const [p] of pt.preTokenizeString(String.fromCodePoint(...cps)))
      for (const ch of p) kept.add(ch.codePointAt(0));
    for (const c of cps) if (!kept.has(c)) matched.push(c);
  }
  return matched;
}
function ranges(cps) {
  const a = [...cps].sort((x, y) => x - y), r = [];
  for (const c of a) {
    if (r.length && r[r.length - 1][1] === c - 1) r[r.length - 1][1] = c;
    else r.push([c, c]);
  }
  return r;
}
const hex = (c) => "0x" + c.toString(16);
function emit(name, cps) {
  const r = ranges(cps);
  console.log(`static const tok_range ${name}[] = {`);
  let line = "   ";
  for (const [a, b] of r) {
    const item = ` {${hex(a)}, ${hex(b)}},`;
    if (line.length + item.length > 98) { console.log(line); line = "   "; }
    line += item;
  }
  console.log(line + "\n};");
}

const pcre = process.argv[3] ? JSON.parse(fs.readFileSync(process.argv[3])) : null;
const sp = hfClass("\\s"), L = hfClass("\\p{L}"), N = hfClass("\\p{N}");
emit("hf_space", sp);
if (pcre) {
  const PL = new Set(pcre.L), PN = new Set(pcre.N);
  emit("hf_letter_extra", L.filter((c) => !PL.has(c)));
  emit("hf_number_extra", N.filter((c) => !PN.has(c)));
  const HL = new Set(L), HN = new Set(N);
  const missing = pcre.L.filter((c) => !HL.has(c)).length + pcre.N.filter((c) => !HN.has(c)).length;
  if (missing) console.error(`warning: PCRE2 has ${missing} L/N code points HF does not`);
} else {
  emit("hf_letter", L);
  emit("hf_number", N);
}

// NFC: code points HF's normalizer treats as inert although modern Unicode gives them a
// combining class or a composition.  Found by comparing HF with ICU (node's String.normalize).
const tj = {
  version: "1.0", truncation: null, padding: null, added_tokens: [], normalizer: { type: "NFC" },
  pre_tokenizer: null, post_processor: null, decoder: null,
  model: { type: "BPE", dropout: null, unk_token: null, continuing_subword_prefix: null,
           end_of_word_suffix: null, fuse_unk: false, byte_fallback: false, ignore_merges: false,
           vocab: { a: 0 }, merges: [] },
};
const norm = Tokenizer.fromString(JSON.stringify(tj)).getNormalizer();
const inert = new Set();
for (const c of allCps) {
  const s = String.fromCodePoint(c);
  if (/\p{M}/u.test(s)) {
    // a mark with a combining class HF does not know is not reordered by HF
    for (const t of ["a" + s + "\u0316", "a\u0301" + s, "a\u0316" + s, "a" + s + "\u0301"])
      if (norm.normalizeString(t) !== t.normalize("NFC")) inert.add(c);
  }
  const d = s.normalize("NFD");
  if (d !== s && d.normalize("NFC") === s && norm.normalizeString(d) !== s) {
    // a composition HF does not know: its starter (first element, a letter HF sees as inert)
    // must stay alone so nothing composes with it; the last element may be a common mark
    inert.add(d.codePointAt(0));
  }
}
inert.add(0x11a7); // utf8proc 2.8 composes <LV, U+11A7>, which NFC must not (TIndex 0)
emit("hf_nfc_inert", [...inert]);
