"""Packaging for llm_book: everything is read from settings.ini (nbdev's single source of truth)."""
from configparser import ConfigParser
from pathlib import Path

import setuptools

config = ConfigParser(delimiters=["="])
config.read(Path(__file__).parent / "settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

licenses = {"mit": ("MIT License", "OSI Approved :: MIT License")}
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable"]
py_versions = "3.10 3.11 3.12 3.13".split()
lic = licenses[cfg["license"].lower()]
min_python = cfg["min_python"]

requirements = cfg.get("requirements", "").split()
dev_requirements = cfg.get("dev_requirements", "").split()
# Hugging Face interop and GGUF files: only users of llm_book.hf / llm_book.gguf need these.
hf_requirements = ["transformers>=4.46", "tokenizers", "accelerate"]
# benchmarks/: the peers measured in the same run (Transformers, and llama.cpp, which builds from source).
# llama.cpp builds for the CPU it is built on (-march=native). On a virtual machine whose CPU lists AMX but whose
# kernel does not grant it, its batched matmuls die with 'Illegal instruction'; build it without AMX instead:
#   CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON" \
#     pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python
bench_requirements = hf_requirements + ["llama-cpp-python>=0.3"]
serve_requirements = ["fastapi>=0.110", "uvicorn>=0.29"]   # `llm_book serve` (chapter 49)
serve_test_requirements = ["openai>=1.40", "httpx"]          # the tests talk to the server with the official client

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    license=lic[0],
    classifiers=[
        "Development Status :: " + statuses[int(cfg["status"])],
        "Intended Audience :: " + cfg["audience"].title(),
        "Natural Language :: " + cfg["language"].title(),
        "License :: " + lic[1],
    ]
    + [f"Programming Language :: Python :: {v}" for v in py_versions[py_versions.index(min_python):]],
    url=cfg["git_url"],
    packages=setuptools.find_packages(include=["llm_book", "llm_book.*"]),
    include_package_data=True,
    package_data={"llm_book": ["data/*"]},
    install_requires=requirements,
    extras_require={"dev": dev_requirements + hf_requirements + serve_test_requirements, "hf": hf_requirements,
                    "bench": bench_requirements, "serve": serve_requirements},
    dependency_links=cfg.get("dep_links", "").split(),
    python_requires=">=" + min_python,
    long_description=Path("README.md").read_text(encoding="utf-8") if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    zip_safe=False,
    entry_points={
        "console_scripts": cfg.get("console_scripts", "").split(),
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
    author=cfg["author"],
    author_email=cfg["author_email"],
    description=cfg["description"],
    keywords=cfg["keywords"],
)
