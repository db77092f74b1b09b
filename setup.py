"""Builds the optional Cython hot path (upmt_tun.dataplane._fast); everything else is in
pyproject.toml. Without Cython or a C compiler the build goes on without it and
upmt_tun uses its pure-Python fallback (same results, slower)."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """A failed compile is a warning, not a failed install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any build failure means "no extension"
            print(f"warning: upmt_tun's C hot path not built ({e}); using pure Python")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"warning: {ext.name} not built ({e}); using pure Python")


try:
    from Cython.Build import cythonize
except ImportError:   # no Cython: pure Python
    extensions = []
else:
    extensions = cythonize(
        [Extension("upmt_tun.dataplane._fast", ["src/upmt_tun/dataplane/_fast.pyx"],
                   extra_compile_args=["-O3"])],
        compiler_directives={"language_level": 3}, quiet=True)

setup(ext_modules=extensions, cmdclass={"build_ext": OptionalBuildExt})
