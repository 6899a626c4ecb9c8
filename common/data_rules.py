"""Which decoded images a site lets into training: modalities, burned-in annotation, series sampling.

The site policy (client/site/policy.py, `[data]`) owns these values; this module only applies them, so the scan,
the site loader and the trainer judge an image the same way. Applied after decoding (the cache does not
depend on the policy, so changing the policy never re-decodes the archive).
"""

from __future__ import annotations

from dataclasses import dataclass

# Modalities read by default: radiographs and the cross-sectional ones this issue added. NM and PT are
# read and listed but only used where the policy names them (low resolution, tracer-specific intensities).
DEFAULT_MODALITIES = ("CR", "DX", "DR", "RG", "MG", "XA", "RF", "CT", "MR", "US", "OT")
MODALITY_REASON = "modality-excluded"
BURNED_IN_REASON = "burned-in-annotation"


@dataclass(frozen=True)
class DataRules:
    """`modalities`: allowed (empty = any); `burned_in_ok`: use images whose BurnedInAnnotation is YES;
    `max_series_share`: largest share of a round's pool one series may be (0 = no cap);
    `min_slice_spacing`: mm between slices kept from one ordered series (0 = every slice)."""

    modalities: tuple[str, ...] = DEFAULT_MODALITIES
    burned_in_ok: bool = False
    max_series_share: float = 0.1
    min_slice_spacing: float = 0.0

    def refuse(self, meta: dict) -> tuple[str, str] | None:
        """(reason, detail) if an image with these header fields may not be used, else None."""
        modality = str(meta.get("modality") or "").upper()
        if self.modalities and modality not in self.modalities:
            return MODALITY_REASON, f"modality {modality or '(none)'} is not in the site policy's data.modalities"
        if str(meta.get("burned_in") or "").upper() == "YES" and not self.burned_in_ok:
            return BURNED_IN_REASON, ("BurnedInAnnotation YES: text may identify the patient (site policy "
                                      "data.allow_burned_in = false)")
        return None
