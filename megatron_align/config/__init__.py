from megatron_align.config.base import (  # noqa: F401
    ConfigError,
    atomic_write_text,
    config_hash,
    deep_merge,
    from_dict,
    load_config,
    load_yaml,
    parse_overrides,
    save_yaml,
    to_dict,
)
