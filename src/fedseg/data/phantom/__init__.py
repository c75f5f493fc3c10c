"""Analytic T2-weighted male pelvis phantom, evaluated on an acquisition grid.

Pure numpy/scipy, no file I/O. One call of :func:`render` turns a patient
(:class:`Anatomy`, drawn by :func:`sample_anatomy`) and a scan
(:class:`Acquisition`) into an image, a gland label and the affine.

Model, in a patient frame centred on the gland (mm, x = right, y = anterior,
z = superior; the patient may be rotated about z on the table):

* tissues are painted as a uint8 map on a grid that has the acquisition's
  in-plane pixels and ``n_sub`` points through each slice; each voxel's
  signal is the mean over its through-slice points (partial volume);
* signal per tissue from the spin-echo equation
  ``S = PD * (1 - exp(-TR/T1)) * exp(-TE/T2)`` (3 T values in ``TISSUES``),
  so a site's TR/TE changes contrast;
* then per-tissue texture (smooth random field), an in-plane Gaussian
  point-spread function, a smooth multiplicative bias field, the endorectal
  coil receive profile (image normalised to the gland's sensitivity, so it is
  dark away from the coil), Rician noise.

Modules, in the order a case is made:

* ``tissues``  — the tissue table, codes of the tissue map, spin-echo signal;
* ``anatomy``  — :class:`Anatomy`, :func:`sample_anatomy`, the gland's shape (level set);
* ``grid``     — :class:`Acquisition` and the sampling :class:`~fedseg.data.phantom.grid.Frame`;
* ``fields``   — smooth Gaussian random fields (texture, bias, septa);
* ``paint``    — painting primitives (ellipsoid, rod, bone);
* ``pelvis``   — body, muscles, bones, pelvic organs, rectum or coil, septa;
* ``gland``    — the gland's zones and the site's label;
* ``imaging``  — image formation (partial volume, texture, PSF, bias, coil, noise);
* ``render``   — :class:`Phantom` and :func:`render`, which calls all of the above.
"""

from fedseg.data.phantom.anatomy import Anatomy, draw_gland_volume, sample_anatomy
from fedseg.data.phantom.grid import Acquisition
from fedseg.data.phantom.render import Phantom, render
from fedseg.data.phantom.tissues import CODE, tissue_signal

__all__ = [
    "CODE", "Acquisition", "Anatomy", "Phantom", "draw_gland_volume", "render", "sample_anatomy", "tissue_signal",
]
