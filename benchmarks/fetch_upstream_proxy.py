"""Fetch vLLM 0.33.0's `disagg_epd_proxy.py` and give it a venv of its own, under bench-results/upstream/.

`pip download --no-binary :all: vllm==0.33.0` tries to build the sdist and fails without CUDA,
so the tarball's link is read from the package index's simple page (pip's own index URL).
Nothing of the upstream proxy is committed; it is only run beside ours by proxy_vs_router.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import urllib.request

from _harness import RESULTS

VERSION = "0.33.0"
MEMBER = f"vllm-{VERSION}/examples/disaggregated/disaggregated_encoder/disagg_epd_proxy.py"
DEPENDENCIES = ["fastapi", "uvicorn", "uvloop", "aiohttp", "msgspec", "pydantic"]


def main() -> int:
    from pip._internal.models.index import PyPI

    target = RESULTS / "upstream"
    target.mkdir(parents=True, exist_ok=True)
    proxy = target / "disagg_epd_proxy.py"
    if not proxy.exists():
        index = PyPI.simple_url.rstrip("/") + "/vllm/"
        req = urllib.request.Request(index, headers={"Accept": "text/html"})
        html = urllib.request.urlopen(req, timeout=120).read().decode()
        links = re.findall(rf'href="([^"]*vllm-{re.escape(VERSION)}\.tar\.gz[^"]*)"', html)
        if not links:
            print(f"no vllm-{VERSION}.tar.gz on {index}", file=sys.stderr)
            return 1
        tarball = target / f"vllm-{VERSION}.tar.gz"
        print(f"downloading {links[0].split('#')[0]}")
        urllib.request.urlretrieve(links[0].split("#")[0], tarball)
        with tarfile.open(tarball) as archive:
            proxy.write_bytes(archive.extractfile(MEMBER).read())
        tarball.unlink()
    venv = target / "venv"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *DEPENDENCIES], check=True)
    print(f"upstream proxy: {proxy}\nits python:     {venv / 'bin' / 'python'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
