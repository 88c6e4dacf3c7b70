#!/usr/bin/env bash
# The package works when installed from a wheel (issue 12): build the wheel, install it (not
# editable) into a fresh virtual environment outside the checkout, and run the quick demo, a
# distillation and a fine-tuning by recipe name from an empty folder. The recipes, the demo's
# configs and the shipped teacher must come from the installed package, not from this checkout.
#   .ci/wheel_check.sh [--no-demo]
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=$(mktemp -d /tmp/fdistill-wheel.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
python3 -m pip wheel --quiet --no-deps --wheel-dir "$WORK/dist" "$REPO"
python3 -m venv "$WORK/venv"
V="$WORK/venv/bin"
"$V/pip" install --quiet --upgrade pip
"$V/pip" install --quiet -r "$REPO/requirements-torch.txt"
"$V/pip" install --quiet "$WORK"/dist/fdistill-*.whl
mkdir "$WORK/cwd" && cd "$WORK/cwd"
where=$("$V/python" -c "import fdistill, os; print(os.path.dirname(fdistill.__file__))")
case "$where" in "$WORK"/venv/*) ;; *) echo "fdistill imported from $where, not the wheel" >&2; exit 1;; esac
"$V/fdistill" recipes > recipes.txt
grep -q "^distill/clip_vit_base_300ep " recipes.txt
"$V/fdistill" distill --config tiny_cpu --output runs/tiny train.max_steps=3
"$V/fdistill" finetune --config vit_base --model runs/tiny --train synthetic:64 --output runs/ft \
    max_steps=2 data.img_size=32 data.batch_size=8 data.num_workers=0 device=cpu
"$V/python" -c "import fdistill.assets as a; print(a.teacher_spec())" | grep -q "$WORK/venv/"
if [ "${1:-}" != "--no-demo" ]; then
    "$V/fdistill" demo --quick --output runs/demo
    "$V/fdistill" demo --check --output runs/demo
fi
echo "wheel check: OK ($(ls "$WORK"/dist))"
