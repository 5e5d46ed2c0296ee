#!/usr/bin/env bash
# Build the sdist and wheel (python -m build), check the wheel's contents (the package and
# nothing else: no tests, benchmarks or docs), install the wheel in a fresh venv with only
# torch and numpy, and use it from outside the source tree: the layers forward and backward,
# the frozen form and folding, and the CLI's help without the [repro] extra.
#
# Usage: scripts/check_wheel.sh [PYTHON]   (PYTHON builds the wheel and needs the `build`
# package: pip install 'bgnorm[release]'; default: .venv/bin/python, else python3)
# Env: TORCH_VERSION (default 2.13.0, the version the project is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${1:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bgnorm-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS

"$PY" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || {
    cat "$WORK/build.log"; echo "check_wheel: python -m build failed" >&2; exit 1; }
wheel=$(ls "$WORK"/dist/bgnorm-*.whl)
sdist=$(ls "$WORK"/dist/bgnorm-*.tar.gz)
echo "built $(basename "$wheel") and $(basename "$sdist") ($((SECONDS - start)) s)"

# contents: every module of src/bgnorm in the wheel, nothing outside bgnorm/ and its dist-info;
# the sdist has the tests (with their helpers) and the docs
"$PY" - "$wheel" "$sdist" "$ROOT" <<'PYEOF'
import sys
import tarfile
import zipfile
from pathlib import Path

wheel, sdist, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
names = zipfile.ZipFile(wheel).namelist()
stray = [n for n in names if not (n.startswith("bgnorm/") or ".dist-info/" in n)]
assert not stray, f"the wheel holds files outside the package: {stray}"
package = root / "src" / "bgnorm"
# the modules, plus the guides (docs/*.md through the src/bgnorm/docs link; not docs/api)
source = {str(p.relative_to(root / "src")) for p in package.rglob("*")
          if p.is_file() and "__pycache__" not in p.parts and "docs" not in p.parts}
source |= {f"bgnorm/docs/{p.name}" for p in (root / "docs").glob("*.md")}
missing = sorted(source - set(names))
assert not missing, f"the wheel lacks package files: {missing}"
extra = sorted(n for n in names if n.startswith("bgnorm/") and n not in source)
assert not extra, f"the wheel holds files not in src/bgnorm: {extra}"
members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
for need in ("tests/conftest.py", "tests/reference.py", "tests/integrations/test_mmengine.py",
             "docs/api/conf.py", "README.md"):
    assert need in members, f"the sdist lacks {need}"
assert not any("__pycache__" in m or m.startswith("docs/api/_build") for m in members)
print(f"wheel: {len(names)} files, all of src/bgnorm (modules and guides) and nothing else; sdist: {len(members)} "
      "entries with tests and docs")
PYEOF

# a fresh venv with only torch and numpy, then the wheel without its extras
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "torch==$TORCH_VERSION" numpy
"$WORK/venv/bin/pip" install -q "$wheel"  # its dependencies are met: nothing else comes
"$WORK/venv/bin/pip" check
echo "installed in a fresh venv ($((SECONDS - start)) s)"

cd "$WORK"  # away from the source tree: the installed package is the one imported
"$WORK/venv/bin/python" - <<'PYEOF'
import torch
from torch import nn

import bgnorm

assert "site-packages" in bgnorm.__file__, bgnorm.__file__
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 16, 3), bgnorm.BatchGroupNorm2d(16, num_groups=4), nn.ReLU(),
                    nn.Conv2d(16, 8, 1), bgnorm.GeneralBatchGroupNorm2d(8, 2, 2),
                    bgnorm.PositionalNorm(8))
x = torch.randn(4, 3, 8, 8, requires_grad=True)
net(x).square().mean().backward()
assert x.grad is not None and torch.isfinite(x.grad).all()
assert all(p.grad is not None for p in net.parameters())
y = bgnorm.functional.batch_group_norm(torch.randn(2, 8, 4, 4), 4, training=True)
assert y.shape == (2, 8, 4, 4)
net.eval()
frozen = bgnorm.freeze_norms(net)
report = bgnorm.fuse_conv_norm(frozen, warn=False)
z = torch.randn(2, 3, 8, 8)
assert report.folded and torch.allclose(report.model(z), net(z), atol=1e-5)
print(f"bgnorm {bgnorm.__version__} from {bgnorm.__file__}: forward, backward, freeze, fuse ok")
PYEOF

# the CLI without the [repro] extra: its help, and what a reproduction says
"$WORK/venv/bin/bgnorm" --help >"$WORK/help.txt"
head -3 "$WORK/help.txt"
set +e
"$WORK/venv/bin/bgnorm" tasks >"$WORK/tasks.txt" 2>&1
rc=$?
set -e
echo "bgnorm tasks without [repro]: exit $rc; last line: $(tail -1 "$WORK/tasks.txt")"
echo "check_wheel: ok ($((SECONDS - start)) s)"
