"""Build the Cython kernels of src/prune_ext (numpy + scipy's cython_blas, no TensorFlow)."""
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "prune_ext._kernels",
        ["src/prune_ext/_kernels.pyx"],
        depends=["src/prune_ext/_simd.h", "src/prune_ext/_trunk.h"],  # vector kernels, once per instruction set
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "prune_ext._convert",
        ["src/prune_ext/_convert.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True,
                             "initializedcheck": False},
    ),
)
