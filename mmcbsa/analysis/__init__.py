from .complexity import (EXTRA_OP_HANDLES, FLOPS_CONVENTION, NO_MAC_OPS, baddbmm_flop_jit,
                         build_model_from_config, flop_analyzer, input_shape_from_config,
                         matmul_flop_jit, model_complexity, native_mha_flop_jit, sdpa_flop_jit)

__all__ = [
    'EXTRA_OP_HANDLES', 'FLOPS_CONVENTION', 'NO_MAC_OPS', 'baddbmm_flop_jit',
    'build_model_from_config', 'flop_analyzer', 'input_shape_from_config', 'matmul_flop_jit',
    'model_complexity', 'native_mha_flop_jit', 'sdpa_flop_jit'
]
