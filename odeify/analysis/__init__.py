"""Analysis of the dynamics of an odeified transformer.

    from odeify.analysis import spectra, lyapunov
    s = spectra(model, times=64)    # per head: eigenvalues of W_Q W_K^T and W_V W_O over t
    lam = lyapunov(model, ids)      # per token: finite-time Lyapunov exponents of the flow

``write_report`` (odeify.analysis.report) draws both and writes PNGs, an HTML page and JSON; the
CLI is ``odeify analyze``.
"""

from .benettin import FlowExponents, finite_time_lyapunov, jvp_tangent, vjp_adjoint
from .heads import HeadShape
from .lyapunov import Lyapunov, lyapunov
from .spectra import Spectra, spectra

__all__ = [
    "FlowExponents",
    "HeadShape",
    "Lyapunov",
    "Spectra",
    "finite_time_lyapunov",
    "jvp_tangent",
    "lyapunov",
    "spectra",
    "vjp_adjoint",
]
