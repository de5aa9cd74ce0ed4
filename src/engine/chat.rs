//! Chat messages through the model's Jinja chat template (Hugging Face conventions: `messages`, `bos_token`,
//! `eos_token`, `add_generation_prompt`, `raise_exception`).

use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use super::EngineError;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Compiles `source`; `bos`/`eos` are the token strings the template may insert.
    pub fn new(source: &str, bos: Option<&str>, eos: Option<&str>) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos: bos.unwrap_or_default().into(),
            eos: eos.unwrap_or_default().into(),
        })
    }

    /// Renders the conversation, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[Message]) -> Result<String, EngineError> {
        let t = self.env.get_template("chat").expect("added in new");
        t.render(minijinja::context! {
            messages => messages,
            bos_token => self.bos,
            eos_token => self.eos,
            add_generation_prompt => true,
        })
        .map_err(|e| EngineError::ChatTemplate(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The template of microsoft/bitnet-b1.58-2B-4T (and of bitnetd's default model).
    const B2B4T: &str = "{% for message in messages %}{% set content = message['role'] | capitalize + ': '+ \
        message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}\
        {% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}";

    #[test]
    fn renders_2b4t_template() {
        let t = ChatTemplate::new(B2B4T, Some("<|begin_of_text|>"), None).unwrap();
        let m = |r: &str, c: &str| Message {
            role: r.into(),
            content: c.into(),
        };
        let s = t
            .render(&[m("system", "Be brief."), m("user", " Hi ")])
            .unwrap();
        assert_eq!(
            s,
            "<|begin_of_text|>System: Be brief.<|eot_id|>User: Hi<|eot_id|>Assistant: "
        );
    }

    #[test]
    fn raise_exception_is_a_typed_error() {
        let t =
            ChatTemplate::new("{{ raise_exception('roles must alternate') }}", None, None).unwrap();
        let e = t.render(&[]).unwrap_err();
        assert!(
            matches!(e, EngineError::ChatTemplate(ref m) if m.contains("roles must alternate")),
            "{e}"
        );
    }
}
