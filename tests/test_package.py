"""Package-level promises: light import, lazy names."""

import subprocess
import sys


def test_import_does_not_pull_matplotlib_or_sklearn():
    code = (
        "import sys, vaelab; vaelab.build_model; vaelab.elbo; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'sklearn')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_lazy_exports_resolve():
    import vaelab

    for name in ("build_model", "elbo", "iwae", "Config", "load_preset", "VAE", "save_model"):
        assert getattr(vaelab, name) is not None
