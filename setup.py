"""Install cax: the per-site data-management daemon (see README.rst)."""

from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("cax/__init__.py").read_text(), version)

setup(
    name="cax",
    version=version["__version__"],
    description="Copying All XENON: per-site daemon that moves, verifies and records experiment data",
    long_description=Path("README.rst").read_text() if Path("README.rst").exists() else "",
    long_description_content_type="text/x-rst",
    author="The cax developers",
    license="ISC",
    url="https://github.com/XENON1T/cax",
    packages=find_packages(include=["cax", "cax.*"]),
    package_data={"cax": ["*.json"]},
    python_requires=">=3.9",
    install_requires=[
        "click>=8.0",
        "pymongo>=4.0",
        "mongomock>=4.1",
        "paramiko>=3.0",
        "scp>=0.14",
        "prometheus_client>=0.16",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6", "docutils>=0.18"],
    },
    entry_points={
        "console_scripts": [
            "cax=cax.cli:main",
            "massive-cax=cax.cli:massive_cax",
            "massive-tsm=cax.cli:massive_tsm",
            "cax-mv=cax.cli:cax_mv",
            "cax-rm=cax.cli:cax_rm",
            "cax-stray=cax.cli:cax_stray",
        ],
    },
    classifiers=[
        "License :: OSI Approved :: ISC License (ISCL)",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Physics",
    ],
)
