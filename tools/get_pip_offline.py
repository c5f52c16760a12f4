"""Stand-in for get-pip.py that ansible-test runs to bootstrap pip in its sanity virtual environments.

tools/bootstrap.sh copies this next to the pip wheel downloaded from PyPI (the real script is
downloaded from a host that is unreachable offline). It installs pip from that wheel, with the
same command line as get-pip.py: pip install options and requirements, plus get-pip's own
--no-setuptools and --no-wheel flags.
"""
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WHEEL = glob.glob(os.path.join(HERE, "pip-@PIP_VERSION@-*.whl"))[0]


def main():
    args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
    sys.path.insert(0, WHEEL)
    from pip._internal.cli.main import main as pip_main  # pylint: disable=import-outside-toplevel

    return pip_main(["install", "--upgrade", "--force-reinstall", "--find-links", HERE] + args)


if __name__ == "__main__":
    sys.exit(main())
