#!/usr/bin/python3
"""make_sample_corpus.py — a sample image-text corpus built only from Debian-packaged data.

usage: /usr/bin/python3 scripts/make_sample_corpus.py OUTDIR [--items N] [--tar-shards K]

Images: the colour emoji bitmaps of Noto Color Emoji (package fonts-noto-color-emoji). Its CBDT
table stores every glyph as a PNG (136x128 RGBA), so each image is a real PNG written byte for
byte as the font holds it; python3-fonttools reads the table. Captions: the emoji's Unicode name
("GRINNING FACE" -> "grinning face"). Text-only items: paragraphs of the licenses in
/usr/share/common-licenses. The mix (image+text, image only, text only) exercises every item kind.

Writes OUTDIR/items.jsonl (images as paths relative to it, under OUTDIR/images/) and, with
--tar-shards K, the same items as K WebDataset shards OUTDIR/shards/shard-0000K.tar
(key.png + key.txt + key.json). Deterministic: the same packages give the same corpus.
"""
import argparse
import glob
import io
import json
import os
import sys
import tarfile
import unicodedata

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"


def emoji_pngs():
    """(codepoint, png bytes) for each single-codepoint emoji with a bitmap, by codepoint."""
    from fontTools.ttLib import TTFont  # Debian: python3-fonttools

    font = TTFont(FONT, lazy=True)
    cmap = font.getBestCmap()
    strike = font["CBDT"].strikeData[0]
    out = []
    for cp in sorted(cmap):
        if cp < 0x80:  # keycap bases (#, *, digits): not pictures on their own
            continue
        glyph = strike.get(cmap[cp])
        data = getattr(glyph, "imageData", None) if glyph is not None else None
        if data and data[:8] == b"\x89PNG\r\n\x1a\n":
            out.append((cp, bytes(data)))
    return out


def license_paragraphs():
    out = []
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if not os.path.isfile(path):
            continue
        text = open(path, encoding="utf-8", errors="replace").read()
        for i, para in enumerate(p.strip() for p in text.split("\n\n")):
            if 40 <= len(para) <= 600:
                out.append(("%s#%d" % (os.path.basename(path), i), " ".join(para.split())))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--items", type=int, default=300, help="items in all (default 300)")
    ap.add_argument("--tar-shards", type=int, default=0)
    a = ap.parse_args()
    if not os.path.exists(FONT):
        sys.exit("make_sample_corpus: %s is missing (apt-get install fonts-noto-color-emoji)" % FONT)
    os.makedirs(os.path.join(a.outdir, "images"), exist_ok=True)
    emoji = emoji_pngs()
    paras = license_paragraphs()
    items = []
    ei = pi = 0
    # 3 of every 5 items are image+text, 1 image only, 1 text only.
    while len(items) < a.items and (ei < len(emoji) or pi < len(paras)):
        kind = len(items) % 5
        if kind < 4 and ei < len(emoji):
            cp, png = emoji[ei]
            ei += 1
            name = unicodedata.name(chr(cp), "U+%04X" % cp).lower()
            rel = "images/%05X.png" % cp
            with open(os.path.join(a.outdir, rel), "wb") as f:
                f.write(png)
            it = {"id": "emoji-%05X" % cp, "image": rel}
            if kind < 3:
                it["text"] = name
            items.append((it, png))
        elif pi < len(paras):
            pid, text = paras[pi]
            pi += 1
            items.append(({"id": pid, "text": text}, None))
    with open(os.path.join(a.outdir, "items.jsonl"), "w") as f:
        for it, _ in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    if a.tar_shards > 0:
        sd = os.path.join(a.outdir, "shards")
        os.makedirs(sd, exist_ok=True)
        per = (len(items) + a.tar_shards - 1) // a.tar_shards
        for s in range(a.tar_shards):
            with tarfile.open(os.path.join(sd, "shard-%05d.tar" % s), "w", format=tarfile.USTAR_FORMAT) as t:
                for k, (it, png) in enumerate(items[s * per:(s + 1) * per]):
                    key = "%06d" % (s * per + k)

                    def add(name, data):
                        ti = tarfile.TarInfo(name)
                        ti.size = len(data)
                        ti.mtime = 0
                        t.addfile(ti, io.BytesIO(data))

                    if png is not None:
                        add(key + ".png", png)
                    if "text" in it:
                        add(key + ".txt", it["text"].encode("utf-8"))
                    add(key + ".json", json.dumps({"id": it["id"]}).encode("utf-8"))
    n_img = sum(1 for it, _ in items if "image" in it)
    print("sample corpus: %d items (%d with an image, %d with text) in %s" % (
        len(items), n_img, sum(1 for it, _ in items if "text" in it), a.outdir))


if __name__ == "__main__":
    main()
