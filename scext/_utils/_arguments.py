"""Arguments renamed across the package, kept working for one release with a FutureWarning."""

from __future__ import annotations

import functools
from collections.abc import Callable

from ._warnings import warn


def renamed_arguments(**old_to_new: str) -> Callable:
    """Accept each old keyword argument under its new name, warning once per call.

    ``@renamed_arguments(alpha="student_t_dof")`` lets ``f(alpha=2)`` run as ``f(student_t_dof=2)`` with
    a `FutureWarning`; passing both names is a `TypeError`. The renames are listed in CHANGELOG.md.
    """

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(
                        f"{function.__name__}() got both {old!r} and its new name {new!r}; pass {new!r} only."
                    )
                warn(
                    f"{function.__name__}(): {old!r} is renamed {new!r}; the old name stops working in the "
                    "next release.",
                    FutureWarning,
                )
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        wrapper.renamed_arguments = dict(old_to_new)
        return wrapper

    return decorate
