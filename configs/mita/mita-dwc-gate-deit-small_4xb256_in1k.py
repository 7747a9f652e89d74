# MiTA-DeiT-Small + DWC,Gate (docs/mechanisms.md §5b): MiTA-DeiT-Small whose attention
# projects to q, k, v and a gate g (Linear C -> 4C), adds a 3x3 depth-wise conv of the
# values and multiplies by SiLU(g) before the output projection. Everything else (DeiT
# recipe) is the MiTA-DeiT-Small config's.
_base_ = ['./mita-deit-small_4xb256_in1k.py']

model = dict(backbone=dict(arch='mita-deit-small-dwc-gate'))
