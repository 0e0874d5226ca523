"""Builds vllm_sleep_ext's C++ extension through CMake and ninja (the layout of pybind11's cmake_example)."""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: str = "") -> None:
        super().__init__(name, sources=[])
        self.source_dir = os.fspath(Path(source_dir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_type = os.environ.get("CMAKE_BUILD_TYPE", "Debug" if self.debug else "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            "-G", "Ninja",
        ]
        try:
            import pybind11

            args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            pass  # CMake then looks for an installed pybind11 by itself
        if "CUDA_HOME" in os.environ:
            args.append(f"-DCUDAToolkit_ROOT={os.environ['CUDA_HOME']}")
        build_dir = Path(self.build_temp) / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.source_dir, *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--target", "_core"], cwd=build_dir, check=True)


setup(
    name="vllm_sleep_ext",
    version="0.1.0",
    description="A sleep-mode GPU allocator for vLLM that keeps model buffers and runs at the PCIe limit",
    packages=find_packages(include=["vllm_sleep_ext", "vllm_sleep_ext.*"]),
    ext_modules=[CMakeExtension("vllm_sleep_ext._core")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    install_requires=["torch"],
    entry_points={
        "vllm.general_plugins": ["vllm_sleep_ext = vllm_sleep_ext.plugin:register"],
        "console_scripts": ["vllm-sleep-ext = vllm_sleep_ext.__main__:main"],
    },
    zip_safe=False,
)
