"""random-LTD: kept-token sampling, gather/scatter, kept-length schedules, layer-token accounting,
TokenBypass importance, and the training loop's driver."""

from megatron.ltd.dropping import (TokenDropState, flat_token_indices, gather_attention_mask,
                                   gather_position_ids, gather_tokens, kept_indices_by_layer,
                                   kept_indices_for_layers, middle_layer_kept_lengths,
                                   sample_kept_indices, scatter_tokens)
from megatron.ltd.schedule import (SCHEDULE_TYPES, KeptLengthSchedule, RandomLTDScheduler,
                                   linear_layer_starts)
from megatron.ltd.layer_tokens import (cumulative_layer_tokens, iterations_for_layer_tokens,
                                       layer_averaged_seq_length, layer_token_lr_horizons,
                                       layer_token_lr_horizons_from_args, layer_tokens_per_step,
                                       run_layer_token_saving, theoretical_saving,
                                       total_layer_tokens)
from megatron.ltd.config import (RandomLTDConfig, add_random_ltd_args, load_deepspeed_config,
                                 random_ltd_config_from_args)
from megatron.ltd.tokenbypass import TokenImportance, bypass_layer_ids, tokenbypass_config
from megatron.ltd.driver import TokenDropper, TokenDroppingDriver
