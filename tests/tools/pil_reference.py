#!/usr/bin/python3
"""pil_reference.py — the Qwen3-VL image processor in Pillow + numpy, the oracle for
tests/unit/test_image.c (run with /usr/bin/python3, which has python3-pil and python3-numpy).

It replicates transformers' two processor paths from their source (qwen3vl-spec.md §2.5):
  * decode: PIL.Image.open -> ImageOps.exif_transpose -> convert("RGB")   (image_utils.load_image)
  * smart_resize: transformers 5.x image_processing_qwen2_vl.smart_resize
  * resize "pil": Pillow's Image.resize(BICUBIC) itself (the slow / PIL processor)
  * resize "torchvision": a numpy port of torch's uint8 antialiased bicubic kernel (what
    torchvision.transforms.v2.functional.resize runs on CPU for uint8 input); the same port run with
    Pillow's 22-bit fixed point is checked against real Pillow on every call, so the port is
    validated by the library it was ported from
  * rescale/normalize: image_transforms.rescale/normalize (pil) or the fused float32 form (tv)
  * patchify: the reshape/transpose chain of Qwen2VLImageProcessor._preprocess

Commands (all outputs raw little-endian arrays; shapes on stdout):
  fixtures DIR             write the synthetic test images (made from tests/data/images photos)
  run JOBS                 one job per line:
      decode IN OUT.rgb [noexif]                       -> "W H"
      resize IN.rgb W H OW OH pil|torchvision OUT.rgb  -> "OW OH"
      prep IN OUT.f32 OUT_RESIZED.rgb pil|torchvision MIN MAX [noexif]
                                                       -> "GT GH GW RH RW"
      smart H W FACTOR MIN MAX                         -> "RH RW" or "error"
    each result line is "<job number> <result>"
  bench FILE SECONDS       ms per image of the slow/PIL processor (decode to pixel_values), for
                           bench/bench_image.c
"""
import math
import os
import struct
import sys
import zlib

import numpy as np
from PIL import Image, ImageOps

PATCH, TEMPORAL, MERGE = 16, 2, 2
MEAN = STD = (0.5, 0.5, 0.5)
RESCALE = 1 / 255


# ----------------------------------------------------------------------------------------------
# smart_resize (transformers 5.x)

def smart_resize(height, width, factor, min_pixels, max_pixels):
    if max(height, width) / min(height, width) > 200:
        raise ValueError("aspect ratio")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ----------------------------------------------------------------------------------------------
# Resize: port of the separable fixed-point resampler shared by Pillow and torch

def pil_bicubic(x):
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def torch_bicubic(x):
    A = -0.5
    x = abs(x)
    if x < 1.0:
        return ((A + 2) * x - (A + 3)) * x * x + 1
    if x < 2.0:
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
    return 0.0


def taps(n_in, n_out, kind):
    """(xmin[n_out], weights[n_out, ksize] int64, precision) as Pillow's precompute_coeffs +
    normalize_coeffs_8bpc (kind 'pil') or torch's _compute_index_ranges_int16_weights ('tv')."""
    filt = pil_bicubic if kind == "pil" else torch_bicubic
    scale = n_in / n_out
    fscale = scale if scale >= 1.0 else 1.0
    support = 2.0 * fscale
    ksize = int(math.ceil(support)) * 2 + 1
    inv = 1.0 / fscale
    xmins, ws, wmax = [], [], 0.0
    for i in range(n_out):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in)
        n = min(max(xmax - xmin, 0), ksize)
        w = [filt((j + xmin - center + 0.5) * inv) for j in range(n)]
        total = sum_seq(w)
        if total != 0.0:
            w = [v / total for v in w]
        wmax = max([wmax] + w)
        xmins.append(xmin)
        ws.append(w + [0.0] * (ksize - n))
    if kind == "pil":
        prec = 22
    else:
        prec = 0
        while prec < 22:
            if int(0.5 + wmax * (1 << (prec + 1))) >= (1 << 15):
                break
            prec += 1
    q = np.zeros((n_out, ksize), dtype=np.int64)
    for i, w in enumerate(ws):
        for j, v in enumerate(w):
            v = v * (1 << prec)
            q[i, j] = int(-0.5 + v) if v < 0 else int(0.5 + v)
    return np.array(xmins, dtype=np.int64), q, prec


def sum_seq(vals):
    s = 0.0  # left-to-right, as the C loops
    for v in vals:
        s += v
    return s


def pass_axis(img, n_out, axis, kind):
    """Resample uint8 `img` (H, W, 3) along axis 0 (vertical) or 1 (horizontal)."""
    n_in = img.shape[axis]
    xmin, k, prec = taps(n_in, n_out, kind)
    src = img.astype(np.int64)
    shape = list(img.shape)
    shape[axis] = n_out
    acc = np.full(shape, 1 << (prec - 1) if prec else 0, dtype=np.int64)
    for j in range(k.shape[1]):
        idx = np.clip(xmin + j, 0, n_in - 1)
        gathered = np.take(src, idx, axis=axis)
        wj = k[:, j].reshape((-1, 1, 1) if axis == 0 else (1, -1, 1))
        acc += gathered * wj
    return np.clip(acc >> prec, 0, 255).astype(np.uint8)


def port_resize(rgb, ow, oh, kind):
    out = rgb
    if rgb.shape[1] != ow:
        out = pass_axis(out, ow, 1, kind)
    if rgb.shape[0] != oh:
        out = pass_axis(out, oh, 0, kind)
    return out


def resize(rgb, ow, oh, backend):
    if (rgb.shape[1], rgb.shape[0]) == (ow, oh):
        return rgb.copy()
    pil = np.asarray(Image.fromarray(rgb, "RGB").resize((ow, oh), Image.BICUBIC))
    port_pil = port_resize(rgb, ow, oh, "pil")
    if not np.array_equal(pil, port_pil):
        d = np.abs(pil.astype(int) - port_pil).max()
        raise AssertionError(f"resampler port disagrees with Pillow (max diff {d})")
    if backend == "pil":
        return pil
    return port_resize(rgb, ow, oh, "tv")


# ----------------------------------------------------------------------------------------------
# The processor

def load(path, exif=True):
    im = Image.open(path)
    if exif:
        im = ImageOps.exif_transpose(im)
    return np.ascontiguousarray(np.asarray(im.convert("RGB")))


def normalize(rgb, backend):
    if backend == "pil":
        x = (rgb.astype(np.float64) * RESCALE).astype(np.float32)
        return (x - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    inv = np.float32(1.0 / RESCALE)
    m = np.array(MEAN, dtype=np.float32) * inv
    s = np.array(STD, dtype=np.float32) * inv
    return (rgb.astype(np.float32) - m) / s


def patchify(x):
    h, w, c = x.shape
    p, m, t = PATCH, MERGE, TEMPORAL
    chw = x.transpose(2, 0, 1)[None]               # one frame
    frames = np.concatenate([chw] * t, axis=0)     # repeat the last frame to temporal_patch_size
    gt, gh, gw = frames.shape[0] // t, h // p, w // p
    y = frames.reshape(gt, t, c, gh // m, m, p, gw // m, m, p)
    y = y.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(y.reshape(gt * gh * gw, c * t * p * p)), (gt, gh, gw)


def prep(path, backend, min_pixels, max_pixels, exif=True):
    rgb = load(path, exif)
    rh, rw = smart_resize(rgb.shape[0], rgb.shape[1], PATCH * MERGE, min_pixels, max_pixels)
    resized = resize(rgb, rw, rh, backend)
    pv, thw = patchify(normalize(resized, backend))
    return pv.astype(np.float32), thw, resized


# ----------------------------------------------------------------------------------------------
# Fixtures

def exif_bytes(orientation):
    ex = Image.Exif()
    ex[0x0112] = orientation
    return ex.tobytes()


def png_chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def write_png_raw(path, w, h, bit_depth, color_type, rows, interlace=False, plte=None, extra=b""):
    """A hand-made PNG (Pillow cannot write Adam7 or every bit depth); rows[y] = raw samples."""
    spp = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    bits = spp * bit_depth

    def pack(row_samples):
        if bit_depth == 16:
            return b"".join(struct.pack(">H", int(v)) for v in row_samples)
        if bit_depth == 8:
            return bytes(int(v) for v in row_samples)
        out, acc, nb = bytearray(), 0, 0
        for v in row_samples:
            acc = acc << bit_depth | int(v)
            nb += bit_depth
            if nb == 8:
                out.append(acc)
                acc, nb = 0, 0
        if nb:
            out.append(acc << (8 - nb))
        return bytes(out)

    raw = bytearray()
    if not interlace:
        for r in rows:
            raw += b"\0" + pack(r)
    else:
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                  (1, 0, 2, 2), (0, 1, 1, 2)]
        for x0, y0, dx, dy in passes:
            if x0 >= w or y0 >= h:
                continue
            for y in range(y0, h, dy):
                sub = []
                for x in range(x0, w, dx):
                    sub += list(rows[y][x * spp:(x + 1) * spp])
                raw += b"\0" + pack(sub)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 1 if interlace else 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    if plte is not None:
        data += png_chunk(b"PLTE", plte)
    data += extra + png_chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + png_chunk(b"IEND", b"")
    assert bits
    with open(path, "wb") as f:
        f.write(data)


def fixtures(out, src_dir):
    os.makedirs(out, exist_ok=True)
    cat = Image.open(os.path.join(src_dir, "chelsea.png")).convert("RGB")      # 451x300
    rocket = Image.open(os.path.join(src_dir, "rocket.jpg")).convert("RGB")    # 640x427
    cam = Image.open(os.path.join(src_dir, "camera.png"))                      # 512x512 L
    small = cat.resize((97, 61), Image.LANCZOS)
    a = np.asarray(small).astype(np.int64)

    # same photo, lossless: PNG and WebP must give identical patches
    cat.save(f"{out}/cat.png")
    cat.save(f"{out}/cat_lossless.webp", lossless=True, quality=100, method=4)
    cat.save(f"{out}/cat_lossy.webp", quality=80)
    cat.save(f"{out}/cat_q90.jpg", quality=90)
    cat.save(f"{out}/cat_progressive.jpg", quality=85, progressive=True)
    cat.save(f"{out}/cat_420.jpg", quality=90, subsampling=2)
    # aspect ratios: very wide, very tall, tiny (< min_pixels), exact multiple of 32
    cat.resize((1800, 24), Image.BICUBIC).save(f"{out}/wide_1800x24.png")
    rocket.resize((40, 2400), Image.BICUBIC).save(f"{out}/tall_40x2400.jpg", quality=92)
    cat.resize((23, 17), Image.LANCZOS).save(f"{out}/tiny_23x17.png")
    cat.resize((5, 3), Image.LANCZOS).save(f"{out}/tiny_5x3.png")
    rocket.resize((256, 320), Image.LANCZOS).save(f"{out}/exact_256x320.png")
    # modes
    cam.save(f"{out}/gray.png")
    cam.save(f"{out}/gray.jpg", quality=90)
    small.convert("P", palette=Image.ADAPTIVE, colors=200).save(f"{out}/palette.png")
    small.convert("P", palette=Image.ADAPTIVE, colors=13).save(f"{out}/palette4.png", bits=4)
    rgba = small.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, small.size[0]).astype(np.uint8), (small.size[1], 1))
    rgba.putalpha(Image.fromarray(alpha, "L"))
    rgba.save(f"{out}/rgba.png")
    rgba.save(f"{out}/rgba_lossless.webp", lossless=True)
    rgba.save(f"{out}/rgba_lossy.webp", quality=90)
    Image.merge("LA", (small.convert("L"), Image.fromarray(alpha, "L"))).save(f"{out}/la.png")
    small.convert("CMYK").save(f"{out}/cmyk.jpg", quality=95)
    small.convert("1").save(f"{out}/bilevel.png")
    # 16-bit and low bit depths, written by hand
    h, w = a.shape[:2]
    rgb16 = [list((a[y] * 257 + (y * 7 + np.arange(w)[:, None] * 13) % 251).reshape(-1))
             for y in range(h)]
    write_png_raw(f"{out}/rgb16.png", w, h, 16, 2, rgb16)
    rgba16 = [list(np.concatenate([a[y] * 257 + 100, np.full((w, 1), 40000)], axis=1).reshape(-1))
              for y in range(h)]
    write_png_raw(f"{out}/rgba16.png", w, h, 16, 6, rgba16)
    g = a.mean(axis=2).astype(np.int64)
    write_png_raw(f"{out}/gray16.png", w, h, 16, 0, [list(g[y] * 3) for y in range(h)])  # > 255 clip
    write_png_raw(f"{out}/la16.png", w, h, 16, 4,
                  [list(np.stack([g[y] * 257, g[y] * 100], axis=1).reshape(-1)) for y in range(h)])
    write_png_raw(f"{out}/gray2.png", w, h, 2, 0, [list(g[y] >> 6) for y in range(h)])
    write_png_raw(f"{out}/gray4.png", w, h, 4, 0, [list(g[y] >> 4) for y in range(h)])
    write_png_raw(f"{out}/rgb_adam7.png", w, h, 8, 2, [list(a[y].reshape(-1)) for y in range(h)],
                  interlace=True)
    # palette with 4 entries but indices up to 9: Pillow's palette is gray beyond PLTE
    write_png_raw(f"{out}/palette_short.png", 10, 4, 8, 3,
                  [[(x + y) % 10 for x in range(10)] for y in range(4)],
                  plte=bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9]))
    # EXIF orientation 1..8 in JPEG (APP1), and in PNG (eXIf) / WebP (EXIF) for 6
    ori = rocket.resize((96, 64), Image.LANCZOS)
    for o in range(1, 9):
        ori.save(f"{out}/exif{o}.jpg", quality=95, exif=exif_bytes(o))
    ori.save(f"{out}/exif6.png", exif=exif_bytes(6))
    ori.save(f"{out}/exif8.webp", lossless=True, exif=exif_bytes(8))
    # animated WebP: Pillow shows frame 1
    frames = [small, small.transpose(Image.FLIP_LEFT_RIGHT), small.convert("L").convert("RGB")]
    frames[0].save(f"{out}/anim.webp", save_all=True, append_images=frames[1:], duration=100,
                   lossless=True)


# ----------------------------------------------------------------------------------------------

def run(jobs_path):
    for no, line in enumerate(open(jobs_path).read().splitlines()):
        f = line.split()
        if not f:
            continue
        op = f[0]
        try:
            if op == "decode":
                rgb = load(f[1], exif=len(f) < 4 or f[3] != "noexif")
                rgb.tofile(f[2])
                res = f"{rgb.shape[1]} {rgb.shape[0]}"
            elif op == "resize":
                w, h, ow, oh = map(int, f[2:6])
                rgb = np.fromfile(f[1], dtype=np.uint8).reshape(h, w, 3)
                resize(rgb, ow, oh, f[6]).tofile(f[7])
                res = f"{ow} {oh}"
            elif op == "prep":
                pv, (gt, gh, gw), resized = prep(f[1], f[4], int(f[5]), int(f[6]),
                                                 exif=len(f) < 8 or f[7] != "noexif")
                pv.tofile(f[2])
                resized.tofile(f[3])
                res = f"{gt} {gh} {gw} {resized.shape[0]} {resized.shape[1]}"
            elif op == "smart":
                try:
                    rh, rw = smart_resize(*map(int, f[1:6]))
                    res = f"{rh} {rw}"
                except ValueError:
                    res = "error"
            else:
                raise ValueError(f"unknown job {op}")
        except Exception as e:  # reported to the C test, which names the job
            res = f"exception {type(e).__name__}: {e}".replace("\n", " ")
        print(f"{no} {res}", flush=True)


def bench(path, seconds):
    import time

    def once():
        im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        rh, rw = smart_resize(im.height, im.width, PATCH * MERGE, 65536, 16777216)
        if (rw, rh) != im.size:
            im = im.resize((rw, rh), Image.BICUBIC)
        return patchify(normalize(np.asarray(im), "pil"))

    once()
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < seconds:
        once()
        n += 1
    print(f"{1e3 * (time.perf_counter() - t0) / n:.3f}")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "bench":
        bench(sys.argv[2], float(sys.argv[3]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "fixtures":
        src = sys.argv[3] if len(sys.argv) > 3 else os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "..", "data", "images")
        fixtures(sys.argv[2], src)
    elif len(sys.argv) == 3 and sys.argv[1] == "run":
        run(sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
