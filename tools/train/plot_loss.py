"""Draw the loss curve PNG (no plotting library needed: numpy + zlib).

x: training tokens (0 .. max); y: loss from 0 to 4 (grid line every 0.5).
Blue: training loss (log every 25 steps). Red: validation loss (dots, joined).
Usage: python3 plot_loss.py train_log.csv val_log.csv out.png
"""

import csv
import struct
import sys
import zlib

import numpy as np

W, H, M = 800, 480, 40
YMAX = 4.0


def write_png(path, img):
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(img.shape[0]))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", img.shape[1], img.shape[0], 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def main():
    tr = [(float(r["tokens"]), float(r["loss"])) for r in csv.DictReader(open(sys.argv[1]))]
    va = [(float(r["tokens"]), float(r["val_loss"])) for r in csv.DictReader(open(sys.argv[2]))]
    xmax = max(t for t, _ in tr + va)
    img = np.full((H, W, 3), 255, np.uint8)

    def px(t, l):
        return int(M + t / xmax * (W - 2 * M)), int(H - M - min(l, YMAX) / YMAX * (H - 2 * M))

    for k in range(int(YMAX / 0.5) + 1):  # grid
        _, y = px(0, k * 0.5)
        img[y, M:W - M] = (220, 220, 220) if k else (0, 0, 0)
    img[M:H - M + 1, M] = 0

    def line(pts, color, w=1):
        for (a, b) in zip(pts, pts[1:]):
            (x0, y0), (x1, y1) = px(*a), px(*b)
            n = max(abs(x1 - x0), abs(y1 - y0), 1)
            for i in range(n + 1):
                x = round(x0 + (x1 - x0) * i / n)
                y = round(y0 + (y1 - y0) * i / n)
                img[max(0, y - w):y + w + 1, max(0, x - w):x + w + 1] = color

    line(tr, (30, 90, 200))
    line(va, (210, 40, 40), 2)
    for p in va:
        x, y = px(*p)
        img[y - 4:y + 5, x - 4:x + 5] = (210, 40, 40)
    write_png(sys.argv[3], img)


if __name__ == "__main__":
    main()
