"""Packaging. The native CPU kernel's C++ sources (csrc/) ship inside the package as
``fused_cosloss/csrc`` and are compiled with ninja on first use (see fused_cosloss/native.py),
so installing needs no compiler and no torch in the build environment."""
from setuptools import setup

setup(
    packages=["fused_cosloss", "fused_cosloss.csrc", "fused_cosloss.triton_ops"],
    package_dir={"fused_cosloss.csrc": "csrc"},
    package_data={"fused_cosloss.csrc": ["*.cpp", "*.h"]},
)
