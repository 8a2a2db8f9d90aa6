#!/usr/bin/env python3
"""Regenerates README.md's sample output: runs the first `target/release/bitnet run ...` line
of the README (with the binary given, default target/release/bitnet) and writes its stdout
and the statistics line into the ```text block that follows. The test `readme_sample` of the
bitnet-cli crate checks the block against the program.

    cargo build --release && tools/readme_sample.py
"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
readme = root / "README.md"
binary = sys.argv[1] if len(sys.argv) > 1 else str(root / "target/release/bitnet")
text = readme.read_text()
cmd = re.search(r"^target/release/bitnet (run .*)$", text, re.M)
if not cmd:
    sys.exit("README.md has no `target/release/bitnet run ...` line")
args = shlex.split(cmd.group(1))
out = subprocess.run([binary, *args], capture_output=True, text=True, check=True, cwd=root)
stats = out.stderr.strip().splitlines()[-1]
body = out.stdout.rstrip("\n") + "\n" + stats + "\n"
start = text.index("```text\n", cmd.end()) + len("```text\n")
end = text.index("```", start)
readme.write_text(text[:start] + body + text[end:])
print(body, end="")
