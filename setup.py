from setuptools import find_namespace_packages, setup

setup(
    name="pcb_fast",
    version="0.1.0",
    description="Fast, faithful PCB-Merging (NeurIPS 2024) and model-merging baselines",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    license="Apache-2.0",
    # every folder of pcb_fast, found rather than listed; pcb_fast/kernels is a link to the top-level kernels/
    # folder, which has no __init__.py (docs/design.md 1), hence namespace packages
    packages=find_namespace_packages(include=["pcb_fast", "pcb_fast.*"], exclude=["*.__pycache__"]),
    # the C kernels of pcb_fast.cpu.native, compiled on first use (all of them: a wheel that lacked one
    # would leave every kernel unbuilt and the engine on its torch fallbacks)
    package_data={"pcb_fast.cpu": ["*.c", "*.h"]},
    # torch is not pinned here: install the build you need first (the README pins 2.13.0 on CPU).
    # huggingface_hub resolves model names on the Hub (org/name[@revision]) through its shared cache
    install_requires=["torch>=2.4", "numpy", "tqdm", "pyyaml", "cma", "huggingface_hub>=0.34"],
    # Triton runs the GPU kernels (and, under TRITON_INTERPRET=1, their tests on a CPU).
    extras_require={
        "gpu": ["triton>=3.6; platform_system == 'Linux'"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "safetensors>=0.4", "scikit-learn",
                 "triton>=3.6; platform_system == 'Linux'"],
        # peers run side by side in the tests (mergekit 0.1.5's YAML semantics, PEFT's adapters, transformers'
        # models), with Hugging Face's `kernels` beside them: the package our kernels/ must never shadow
        # (docs/design.md 1). Install after torch.
        "peers": ["mergekit==0.1.5", "transformers", "peft", "kernels"],
        # the merge-quality benchmark (real data from scikit-learn, a bar chart) and the benchmark plots
        "bench": ["scikit-learn", "matplotlib", "safetensors>=0.4", "pytest-benchmark>=4"],
        # pcb_fast.integrations.fusion_bench as FusionBench method configs (heavy: lightning, transformers,
        # hydra; not installed by CI, whose tests of the integration run on a minimal model pool)
        "fusionbench": ["fusion-bench>=0.2.33"],
    },
    entry_points={"console_scripts": ["pcb-fast=pcb_fast.cli:main"]},
)
