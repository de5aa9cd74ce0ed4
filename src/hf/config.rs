//! A Hugging Face `config.json` for a BitNet checkpoint: read as a raw serde struct, then validated into an
//! [`Architecture`] that names everything the exporter needs, or an error naming what is unsupported.

use serde::Deserialize;
use std::path::Path;

use super::HfError;

/// Which family of BitNet checkpoint this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// `model_type: bitnet` (`BitNetForCausalLM`, e.g. microsoft/bitnet-b1.58-2B-4T).
    BitNet,
    /// Llama-style 1bitLLM checkpoints (`BitnetForCausalLM`): float master weights, ternarized at load.
    LlamaBitnet,
}

/// The gate activation of the gated FFN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// `relu(x)^2` (2B-4T).
    Relu2,
    /// `x * sigmoid(x)` (Llama-style).
    Silu,
}

/// How a linear layer's stored `weight_scale` enters its output, as transformers implements it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearClass {
    /// `AutoBitLinear`: `out = linear(ActQuant(x), W) * weight_scale`.
    AutoBitLinear,
    /// `BitLinear`: `out = linear(q(x), W) / (input_scale * weight_scale)`.
    BitLinear,
}

/// A validated model architecture. Every field is checked for consistency with the others.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Architecture {
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub activation: Activation,
    /// Maximum context (positions) the model was trained for.
    pub context_length: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub tie_word_embeddings: bool,
    pub linear_class: LinearClass,
    /// True when the linear weights are float master weights ternarized by absmean at export.
    pub online_quant: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn into_vec(self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![i],
            TokenIds::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct RawRope {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawQuant {
    quant_method: Option<String>,
    linear_class: Option<String>,
    quantization_mode: Option<String>,
    #[serde(default)]
    use_rms_norm: bool,
}

/// `config.json` as written by transformers (unknown keys are ignored: HF configs carry many).
#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    hidden_act: Option<String>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRope>,
    rope_scaling: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    quantization_config: Option<RawQuant>,
}

impl Architecture {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, HfError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| HfError::io(&path, e))?;
        Self::from_json(&text)
    }

    /// Validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, HfError> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| HfError::Config(e.to_string()))?;
        raw.validate()
    }
}

fn unsupported(what: impl Into<String>) -> HfError {
    HfError::Unsupported(what.into())
}

impl RawConfig {
    fn validate(self) -> Result<Architecture, HfError> {
        let arch_name = self.architectures.first().cloned().unwrap_or_default();
        let family = match (self.model_type.as_deref(), arch_name.as_str()) {
            (Some("bitnet"), _) | (_, "BitNetForCausalLM") => Family::BitNet,
            (_, "BitnetForCausalLM") => Family::LlamaBitnet,
            (mt, a) => {
                return Err(unsupported(format!(
                    "model_type {:?} / architecture {a:?}: only BitNet b1.58 checkpoints \
                     (model_type \"bitnet\", or 1bitLLM BitnetForCausalLM) are supported",
                    mt.unwrap_or("none")
                )))
            }
        };
        let quant = self.quantization_config.unwrap_or_default();
        if let Some(m) = quant.quant_method.as_deref() {
            if m != "bitnet" {
                return Err(unsupported(format!(
                    "quantization_config.quant_method {m:?}"
                )));
            }
        }
        if quant.use_rms_norm {
            return Err(unsupported(
                "quantization_config.use_rms_norm = true (RMSNorm inside BitLinear)",
            ));
        }
        // transformers' BitNetQuantConfig defaults linear_class to "bitlinear".
        let linear_class = match quant.linear_class.as_deref() {
            Some("autobitlinear") => LinearClass::AutoBitLinear,
            Some("bitlinear") => LinearClass::BitLinear,
            None if quant.quant_method.is_some() => LinearClass::BitLinear,
            None => LinearClass::AutoBitLinear,
            Some(other) => {
                return Err(unsupported(format!(
                    "quantization_config.linear_class {other:?}"
                )))
            }
        };
        let online_quant = match quant.quantization_mode.as_deref() {
            None | Some("offline") => family == Family::LlamaBitnet,
            Some("online") => true,
            Some(other) => {
                return Err(unsupported(format!(
                    "quantization_config.quantization_mode {other:?}"
                )))
            }
        };
        let activation = match self.hidden_act.as_deref() {
            Some("relu2") => Activation::Relu2,
            Some("silu") | Some("swish") => Activation::Silu,
            None if family == Family::LlamaBitnet => Activation::Silu,
            other => {
                return Err(unsupported(format!(
                    "hidden_act {:?}",
                    other.unwrap_or("none")
                )))
            }
        };
        if self.attention_bias || self.mlp_bias {
            return Err(unsupported("linear biases (attention_bias / mlp_bias)"));
        }
        if let Some(s) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(unsupported(format!("rope_scaling {s}")));
        }
        if let Some(t) = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.as_deref())
        {
            if t != "default" {
                return Err(unsupported(format!("rope_type {t:?}")));
            }
        }
        let rope_theta = self
            .rope_theta
            .or(self.rope_parameters.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(10000.0) as f32;
        let heads = self.num_attention_heads;
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / heads.max(1));
        let bad = |m: String| Err(HfError::Config(m));
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return bad(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            ));
        }
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {head_dim} must be even (RoPE rotates halves)"
            ));
        }
        if heads * head_dim != self.hidden_size {
            return bad(format!(
                "num_attention_heads {heads} x head_dim {head_dim} != hidden_size {}",
                self.hidden_size
            ));
        }
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_key_value_heads x head_dim", kv_heads * head_dim),
        ] {
            if v == 0 || v % 4 != 0 {
                return bad(format!(
                    "{name} = {v}: ternary packing needs a positive multiple of 4"
                ));
            }
        }
        if self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return bad("num_hidden_layers and vocab_size must be positive".into());
        }
        Ok(Architecture {
            family,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            vocab_size: self.vocab_size,
            activation,
            context_length: self.max_position_embeddings.unwrap_or(2048),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope_theta,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(family == Family::BitNet),
            linear_class,
            online_quant,
            bos_token_id: self
                .bos_token_id
                .and_then(|t| t.into_vec().first().copied()),
            eos_token_ids: self
                .eos_token_id
                .map(TokenIds::into_vec)
                .unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B2B4T: &str = r#"{"architectures":["BitNetForCausalLM"],"model_type":"bitnet","hidden_size":2560,
        "intermediate_size":6912,"num_hidden_layers":30,"num_attention_heads":20,"num_key_value_heads":5,
        "vocab_size":128256,"hidden_act":"relu2","max_position_embeddings":4096,"rms_norm_eps":1e-5,
        "rope_theta":500000.0,"tie_word_embeddings":true,"bos_token_id":128000,"eos_token_id":128001,
        "quantization_config":{"quant_method":"bitnet","linear_class":"autobitlinear","quantization_mode":"offline"}}"#;

    #[test]
    fn reads_2b4t_layout() {
        let a = Architecture::from_json(B2B4T).unwrap();
        assert_eq!(
            (a.head_dim, a.num_kv_heads, a.family),
            (128, 5, Family::BitNet)
        );
        assert_eq!(a.linear_class, LinearClass::AutoBitLinear);
        assert!(!a.online_quant);
        assert_eq!(a.activation, Activation::Relu2);
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.eos_token_ids, vec![128001]);
    }

    #[test]
    fn bitlinear_and_online_modes() {
        let t = B2B4T.replace("\"autobitlinear\"", "\"bitlinear\"");
        assert_eq!(
            Architecture::from_json(&t).unwrap().linear_class,
            LinearClass::BitLinear
        );
        let t = B2B4T.replace("\"offline\"", "\"online\"");
        assert!(Architecture::from_json(&t).unwrap().online_quant);
    }

    #[test]
    fn rope_parameters_form() {
        let t = B2B4T.replace(
            "\"rope_theta\":500000.0",
            "\"rope_parameters\":{\"rope_theta\":10000.0,\"rope_type\":\"default\"}",
        );
        assert_eq!(Architecture::from_json(&t).unwrap().rope_theta, 10000.0);
    }

    #[test]
    fn names_what_is_unsupported() {
        let e = Architecture::from_json(
            &B2B4T
                .replace("\"bitnet\",\"hidden", "\"llama\",\"hidden")
                .replace("BitNetForCausalLM", "LlamaForCausalLM"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("llama"), "{e}");
        let e = Architecture::from_json(&B2B4T.replace("relu2", "gelu")).unwrap_err();
        assert!(e.to_string().contains("gelu"), "{e}");
        let e = Architecture::from_json(
            &B2B4T.replace("\"num_key_value_heads\":5", "\"num_key_value_heads\":3"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
    }
}
