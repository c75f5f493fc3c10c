"""Per-institution acquisition and annotation profiles for the synthetic data.

Numbers marked "Table 1" / "Table 2" are from Sarma et al., JAMIA 2021
(patient demographics and image acquisition parameters). Everything else
(noise, bias, field of view, vendor scaling, annotation conventions, the
PROSTATEx volumes) is a modelling choice, documented in docs/sites.md, made so
that the sites differ the way real institutions do: contrast (TR/TE), voxel
size, endorectal coil, noise, bias field and how the gland was outlined.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fedseg.errors import DataError


@dataclass(frozen=True)
class Protocol:
    """One T2-weighted axial acquisition (a site may use several, e.g. NCI).

    Attributes:
        coil: endorectal coil in place.
        pixel_mm: in-plane pixel size (square pixels).
        slice_mm: slice thickness = slice spacing (no gap).
        tr_ms, te_ms: repetition and echo time of the spin-echo signal model.
        fov_mm: default in-plane field of view (square).
    """

    coil: bool
    pixel_mm: float
    slice_mm: float
    tr_ms: float
    te_ms: float
    fov_mm: float


@dataclass(frozen=True)
class Annotation:
    """How a site's readers outlined the gland (conventions were not harmonised).

    Attributes:
        capsule_margin_mm: > 0 includes a rim of that width outside the gland
            (the dark capsule); < 0 stays that far inside the gland edge.
        trim_ends_mm: gland length left unlabelled at apex and at base each.
    """

    capsule_margin_mm: float = 0.0
    trim_ends_mm: float = 0.0


@dataclass(frozen=True)
class SiteProfile:
    """Everything the generator needs to imitate one institution.

    Protocols are assigned to cases in turn (case i uses protocols[i % n]),
    so NCI's two protocols each get half the cases, as in Table 2.
    """

    name: str
    vendor: str
    scanner: str
    field_strength_t: float
    protocols: tuple[Protocol, ...]
    volume_median_ml: float
    volume_min_ml: float
    volume_max_ml: float
    noise_level: float  # Rician sigma as a fraction of the fat signal (body coil)
    bias_strength: float  # std of log multiplicative bias field
    intensity_scale: float  # vendor scaling of the unit-PD signal to stored integers
    dtype: str  # stored image dtype, "int16" or "uint16"
    annotation: Annotation
    si_coverage_mm: float = 90.0  # cranio-caudal coverage (grown for large glands)
    psf_sigma_vox: float = 0.6  # in-plane Gaussian point-spread function, voxels (k-space filter)
    external: bool = False
    sources: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def protocol_for_case(self, index: int) -> Protocol:
        """The acquisition used for case ``index`` (round robin over protocols)."""
        return self.protocols[index % len(self.protocols)]

    def to_dict(self) -> dict:
        """JSON-ready description (sources as a mapping)."""
        data = asdict(self)
        data["sources"] = dict(self.sources)
        return data


_T2 = "Sarma et al. 2021 Table 2"
_T1 = "Sarma et al. 2021 Table 1 (prostate size, cc = mL)"
_CHOICE = "modelling choice (not in the paper)"

NCI = SiteProfile(
    name="nci",
    vendor="Philips Medical Systems",
    scanner="Philips 3T (Achieva-class)",
    field_strength_t=3.0,
    protocols=(
        # 0.273 mm x 512 matrix = 140 mm: the usual small-FOV endorectal protocol.
        Protocol(coil=True, pixel_mm=0.273, slice_mm=3.0, tr_ms=4775, te_ms=120, fov_mm=140.0),
        # 0.352 mm = 180 mm / 512: the body-coil protocol covers the whole pelvis width.
        Protocol(coil=False, pixel_mm=0.352, slice_mm=3.0, tr_ms=3686, te_ms=120, fov_mm=180.0),
    ),
    volume_median_ml=65.5,
    volume_min_ml=21.7,
    volume_max_ml=231.0,
    noise_level=0.025,
    bias_strength=0.12,
    intensity_scale=2500.0,
    dtype="uint16",
    annotation=Annotation(capsule_margin_mm=0.8),
    psf_sigma_vox=0.5,
    sources=(
        ("vendor, field strength", _T2),
        ("coil / no coil, half each", _T2 + " (n=50 with, n=50 without endorectal coil)"),
        ("pixel_mm, slice_mm, tr_ms, te_ms", _T2 + ", NCI columns"),
        ("volume median/min/max", _T1 + ", NCI: 65.5 (21.7-231)"),
        ("fov_mm", _CHOICE + ": pixel x a standard matrix: 0.273 mm x 512 = 140 mm (coil), 0.352 mm x 512 = 180 mm"),
        ("noise_level, bias_strength, intensity_scale, dtype, psf_sigma_vox", _CHOICE),
        ("annotation", _CHOICE + ": masks hug the outer capsule (capsule included)"),
    ),
)

SUNY = SiteProfile(
    name="suny",
    vendor="Siemens",
    scanner="Siemens 3T",
    field_strength_t=3.0,
    protocols=(Protocol(coil=False, pixel_mm=0.625, slice_mm=3.0, tr_ms=5500, te_ms=136, fov_mm=200.0),),
    volume_median_ml=72.9,
    volume_min_ml=26.8,
    volume_max_ml=210.0,
    noise_level=0.04,
    bias_strength=0.30,
    intensity_scale=1200.0,
    dtype="int16",
    annotation=Annotation(capsule_margin_mm=-1.0),
    psf_sigma_vox=0.75,
    sources=(
        ("vendor, field strength", _T2),
        ("pixel_mm, slice_mm, tr_ms, te_ms", _T2 + ", SUNY column"),
        ("coil", "Table 2 lists no endorectal coil for SUNY"),
        ("volume median/min/max", _T1 + ", SUNY: 72.9 (26.8-210)"),
        ("fov_mm", _CHOICE + ": 0.625 mm x 320 matrix = 200 mm (the common Siemens prostate T2 TSE setting)"),
        ("noise_level, bias_strength, intensity_scale, dtype, psf_sigma_vox", _CHOICE),
        ("annotation", _CHOICE + ": masks stay ~1 mm inside the capsule"),
    ),
)

UCLA = SiteProfile(
    name="ucla",
    vendor="Siemens",
    scanner="Siemens 3T",
    field_strength_t=3.0,
    protocols=(Protocol(coil=False, pixel_mm=0.664, slice_mm=1.5, tr_ms=2230, te_ms=204, fov_mm=170.0),),
    volume_median_ml=52.1,
    volume_min_ml=15.8,
    volume_max_ml=147.0,
    noise_level=0.06,
    bias_strength=0.22,
    intensity_scale=1800.0,
    dtype="int16",
    annotation=Annotation(trim_ends_mm=3.0),
    psf_sigma_vox=0.6,
    sources=(
        ("vendor, field strength", _T2),
        ("pixel_mm, slice_mm, tr_ms, te_ms", _T2 + ", UCLA column"),
        ("coil", "Table 2 lists no endorectal coil for UCLA"),
        ("volume median/min/max", _T1 + ", UCLA: 52.1 (15.8-147)"),
        ("fov_mm", _CHOICE + ": 0.664 mm x 256 matrix = 170 mm"),
        ("noise_level", _CHOICE + ": highest, thin 1.5 mm slices and long TE cost SNR"),
        ("bias_strength, intensity_scale, dtype, psf_sigma_vox", _CHOICE),
        ("annotation", _CHOICE + ": ~3 mm of apex and of base left unlabelled"),
    ),
)

PROSTATEX = SiteProfile(
    name="prostatex",
    vendor="Siemens",
    scanner="Siemens MAGNETOM Skyra 3T",
    field_strength_t=3.0,
    protocols=(Protocol(coil=False, pixel_mm=0.5, slice_mm=3.6, tr_ms=5660, te_ms=104, fov_mm=192.0),),
    volume_median_ml=55.0,
    volume_min_ml=20.0,
    volume_max_ml=150.0,
    noise_level=0.035,
    bias_strength=0.20,
    intensity_scale=1000.0,
    dtype="int16",
    annotation=Annotation(),
    external=True,
    psf_sigma_vox=0.55,
    sources=(
        ("scanner, coil, pixel_mm, slice_mm", "PROSTATEx public description (Skyra 3T, no ERC, 0.5 mm, 3.6 mm)"),
        ("tr_ms, te_ms", "typical PROSTATEx T2 TSE header values (~5660 / ~104 ms)"),
        ("fov_mm", "PROSTATEx T2 is 384 x 384 at 0.5 mm = 192 mm"),
        ("volume median/min/max", "assumption: plausible screening population, not from the paper"),
        ("noise_level, bias_strength, intensity_scale, dtype, psf_sigma_vox", _CHOICE),
        ("annotation", _CHOICE + ": gland edge, whole length"),
    ),
)

SITE_PROFILES: dict[str, SiteProfile] = {p.name: p for p in (NCI, SUNY, UCLA, PROSTATEX)}


def get_profile(name: str) -> SiteProfile:
    """The profile called ``name`` (case-insensitive).

    Raises:
        DataError: unknown name; the message lists the known ones.
    """
    key = name.strip().lower()
    if key not in SITE_PROFILES:
        known = ", ".join(sorted(SITE_PROFILES))
        raise DataError(f"unknown site profile {name!r}; known profiles: {known}")
    return SITE_PROFILES[key]
