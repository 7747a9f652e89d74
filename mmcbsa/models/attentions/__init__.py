from .adapted_cbsa import AdaptedCBSA, adapted_cbsa_attention
from .cbsa import CBSA
from .mhsa import MHSA
from .mita import MiTA
from .mssa import MSSA
from .primal import PrimalAttention, collect_ksvd_loss
from .tssa import TSSA

__all__ = ['AdaptedCBSA', 'adapted_cbsa_attention', 'CBSA', 'MHSA', 'MiTA', 'MSSA',
           'PrimalAttention', 'TSSA', 'collect_ksvd_loss']
