"""Packages found by setuptools, never listed by hand: `bpfree` and `bpfree_core` (with every
sub-package), and the top-level folders client/, server/, protos/ and bench/ installed as
bpfree.client, bpfree.server, ... so site-packages gains only `bpfree` and `bpfree_core`.
Everything else about the project is in pyproject.toml."""

from setuptools import find_packages, setup

FOLDERS = ("client", "server", "protos", "bench")   # bpfree.FOLDERS, the same four

packages = find_packages(include=["bpfree", "bpfree.*", "bpfree_core", "bpfree_core.*"])
package_dir = {}
for folder in FOLDERS:
    for found in find_packages(include=[folder, f"{folder}.*"]):
        packages.append(f"bpfree.{found}")
        package_dir[f"bpfree.{found}"] = found.replace(".", "/")

setup(packages=packages, package_dir=package_dir)
