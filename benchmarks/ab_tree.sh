#!/usr/bin/env bash
# Export the package and the benchmarks of an older commit beside the tree, for a same-run A/B on the
# device (two builds timed in one call, so run-to-run drift cannot pose as a change):
#   bash benchmarks/ab_tree.sh <commit>          # -> ab/<short sha>/ (ignored by git; $AB_ROOT overrides ab/)
# then carry it to the device (run tool: carry=["ab"]) and time both in one command, e.g.
#   (cd ab/<short sha> && GIT_COMMIT=<full sha> PYTHONPATH=$PWD python benchmarks/bench_kernels.py ... --out $OUT/old.json)
#   PYTHONPATH=$PWD python benchmarks/bench_kernels.py ... --out $OUT/new.json
# The bundled model weights and eval task data are left out (the kernel benchmarks import neither).
set -euo pipefail
rev=${1:?usage: bash benchmarks/ab_tree.sh <commit>}
root=$(git rev-parse --show-toplevel)
sha=$(git -C "$root" rev-parse --short "$rev")
dest="${AB_ROOT:-$root/ab}/$sha"
rm -rf "$dest"
mkdir -p "$dest"
git -C "$root" archive "$sha" tinyserve_patch benchmarks ':(exclude)tinyserve_patch/models' ':(exclude)tinyserve_patch/eval' \
  ':(exclude)benchmarks/results' | tar -x -C "$dest"
echo "$dest ($(du -sh "$dest" | cut -f1)); full sha $(git -C "$root" rev-parse "$sha")"
