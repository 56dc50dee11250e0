"""pip-audit of this environment's packages, saying plainly how many could actually be checked.

    python -m tools.audit [--strict]

Exit 1 on any known vulnerability. When the advisory service cannot be reached (package indexes that
mirror PyPI without its JSON API, closed networks), pip-audit skips every package; that is reported as
"0 of N audited" and fails only with --strict, so that an unreachable service is never mistaken for a
clean bill of health.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strict", action="store_true", help="fail when a package could not be audited")
    args = p.parse_args()
    pip_audit = Path(sys.executable).parent / "pip-audit"
    run = subprocess.run([str(pip_audit), "--progress-spinner", "off", "-f", "json"], capture_output=True, text=True)
    try:
        deps = json.loads(run.stdout)["dependencies"]
    except (json.JSONDecodeError, KeyError):
        sys.exit(f"pip-audit failed ({run.returncode}): {run.stderr.strip()[-500:]}")
    skipped = [d for d in deps if "skip_reason" in d]
    vulnerable = [d for d in deps if d.get("vulns")]
    for d in vulnerable:
        for v in d["vulns"]:
            fixes = ", ".join(v.get("fix_versions", [])) or "no fixed version"
            print(f"VULNERABLE {d['name']} {d['version']}: {v['id']} (fixed in: {fixes})")
    print(f"pip-audit: {len(deps) - len(skipped)} of {len(deps)} packages audited, {len(vulnerable)} vulnerable")
    if skipped and len(skipped) == len(deps):
        print("WARNING: the vulnerability service answered for no package (unreachable from here): nothing was checked")
    if vulnerable or (args.strict and skipped):
        sys.exit(1)


if __name__ == "__main__":
    main()
