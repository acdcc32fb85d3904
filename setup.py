"""hdmole: HDMoLE (hierarchical routing + dynamic thresholds mixture of LoRA experts) for LLM-based ASR."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
REQUIREMENTS = [
    line.strip()
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]
# The test suite's tools (pip install -e .[test]; tools/setup_env.sh installs them). jiwer:
# an independent CER implementation the tests check hdmole.score against.
TEST_REQUIREMENTS = [
    "pytest==9.2.0",
    "pytest-timeout==2.4.0",
    "hypothesis==6.170.17",
    "jiwer==4.0.0",
]

setup(
    name="hdmole",
    version="0.1.0",
    description="Mixture of LoRA experts with hierarchical routing and dynamic thresholds for LLM-based ASR",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hdmole", "hdmole.*"]),
    package_data={"hdmole": ["py.typed"]},
    install_requires=REQUIREMENTS,
    extras_require={"test": TEST_REQUIREMENTS},
    entry_points={
        "console_scripts": [
            "hdmole-prepare=hdmole.bin.prepare:main",
            "hdmole-train=hdmole.bin.train:main",
            "hdmole-decode=hdmole.bin.decode:main",
            "hdmole-score=hdmole.bin.score:main",
            "hdmole-pretrained=hdmole.bin.pretrained:main",
        ]
    },
)
