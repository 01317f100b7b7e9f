"""random-LTD: kept-token sampling, gather/scatter, kept-length schedules, layer-token accounting."""

from megatron.ltd.dropping import (TokenDropState, flat_token_indices, gather_attention_mask,
                                   gather_position_ids, gather_tokens, kept_indices_by_layer,
                                   kept_indices_for_layers, middle_layer_kept_lengths,
                                   sample_kept_indices, scatter_tokens)
