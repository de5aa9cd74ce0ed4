//! Which Kimi model requests go to, and what that model accepts. Pure: the probes feed [`choose`] the ids that
//! `GET /models` lists, and the request body is shaped by [`Traits::of`].
//!
//! `[cloud] model = "auto"` (the default) takes the newest K2 model the account lists, by this preference:
//! every `kimi-k2.N` id, highest `N` first (today `kimi-k2.6`, then `kimi-k2.5`). Ids with a suffix
//! (`kimi-k2.5-preview`) and the retired K2 previews (`kimi-k2-turbo-preview`, `kimi-k2-0905-preview`,
//! `kimi-k2-thinking`, `kimi-latest`) are never chosen automatically. An explicit id is used as it is, and only
//! while the account lists it.

/// What `[cloud] model` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSetting {
    /// `"auto"`: the newest K2 model the account lists.
    Auto,
    /// This id, exactly.
    Fixed(String),
}

impl ModelSetting {
    /// Reads `[cloud] model` (already trimmed and non-empty).
    pub fn parse(s: &str) -> ModelSetting {
        if s.eq_ignore_ascii_case("auto") {
            ModelSetting::Auto
        } else {
            ModelSetting::Fixed(s.to_string())
        }
    }

    /// The id used before the first model list arrives: an explicit id, or auto's first preference today.
    pub fn provisional(&self) -> &str {
        match self {
            ModelSetting::Auto => AUTO_BEFORE_LISTING,
            ModelSetting::Fixed(id) => id,
        }
    }
}

/// Auto's id until the account's list is known (nothing is sent before the first probe answers, see
/// `connectivity`; this only names the model in `status`).
const AUTO_BEFORE_LISTING: &str = "kimi-k2.6";

/// What a model list means for the setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Requests go to this id.
    Chosen(String),
    /// The explicit id is not offered by the account.
    Unlisted(String),
    /// `auto`, and the account lists no `kimi-k2.N` model.
    NoK2,
}

impl Choice {
    /// Why the cloud cannot be used, for logs and `status`; `None` when a model was chosen.
    pub fn problem(&self, listed: &[String]) -> Option<String> {
        let shown = if listed.is_empty() {
            "nothing".to_string()
        } else {
            listed.join(", ")
        };
        match self {
            Choice::Chosen(_) => None,
            Choice::Unlisted(id) => Some(format!(
                "[cloud] model {id:?} is not offered by this account (GET /models lists {shown})"
            )),
            Choice::NoK2 => Some(format!(
                "[cloud] model = \"auto\" found no kimi-k2.N model (GET /models lists {shown}); set an id"
            )),
        }
    }
}

/// Applies `setting` to the ids the account lists.
pub fn choose(setting: &ModelSetting, listed: &[String]) -> Choice {
    match setting {
        ModelSetting::Fixed(id) if listed.iter().any(|m| m == id) => Choice::Chosen(id.clone()),
        ModelSetting::Fixed(id) => Choice::Unlisted(id.clone()),
        ModelSetting::Auto => listed
            .iter()
            .filter_map(|m| k2_version(m).map(|v| (v, m)))
            .max()
            .map_or(Choice::NoK2, |(_, m)| Choice::Chosen(m.clone())),
    }
}

/// `N` of `kimi-k2.N` (digits only, no suffix).
fn k2_version(id: &str) -> Option<u32> {
    let n = id.strip_prefix("kimi-k2.")?;
    n.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| n.parse().ok())?
}

/// `N` of `kimi-k2.N` and of its variants (`kimi-k2.5-preview`).
fn k2_family(id: &str) -> Option<u32> {
    let rest = id.strip_prefix("kimi-k2.")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    rest[..digits].parse().ok()
}

/// What a model accepts, from Moonshot's parameter table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traits {
    /// Takes `thinking: {"type": "enabled" | "disabled"}`, and thinks unless told not to (K2.5 and later).
    pub thinking_switch: bool,
    /// Always thinks (`kimi-k2-thinking*`).
    pub always_thinks: bool,
    /// `temperature` and `top_p` cannot be changed: they are left out of the request (K2.5 and later).
    pub fixed_sampling: bool,
}

impl Traits {
    /// The traits of `model`. Unknown ids are taken as plain chat models that accept every parameter.
    pub fn of(model: &str) -> Traits {
        let new_k2 = k2_family(model).is_some_and(|v| v >= 5);
        Traits {
            thinking_switch: new_k2,
            always_thinks: model.starts_with("kimi-k2-thinking"),
            fixed_sampling: new_k2,
        }
    }

    /// Whether a request that says `thinking` (or not) will think.
    pub fn thinks(&self, asked: Option<bool>) -> bool {
        self.always_thinks || (self.thinking_switch && asked != Some(false))
    }
}

/// The `max_tokens` sent for an answer of `answer` tokens (`None`: the request did not say). A thinking model
/// spends its `max_tokens` on reasoning first, so it gets `reasoning_budget` on top of the answer and the
/// answer at least `min_answer`: a small `max_tokens` cannot end in reasoning alone with an empty answer. A
/// model that does not think gets the answer's own limit (`min_answer` when the request did not say: Kimi's
/// own default is small).
pub fn max_tokens(
    answer: Option<usize>,
    thinks: bool,
    min_answer: usize,
    reasoning_budget: usize,
) -> usize {
    match (answer, thinks) {
        (a, true) => a.unwrap_or(min_answer).max(min_answer) + reasoning_budget,
        (Some(a), false) => a,
        (None, false) => min_answer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn auto_takes_the_highest_k2_version_listed() {
        let listed = ids(&[
            "moonshot-v1-8k",
            "kimi-k2.5",
            "kimi-k2.6",
            "kimi-k2.10-preview",
        ]);
        assert_eq!(
            choose(&ModelSetting::Auto, &listed),
            Choice::Chosen("kimi-k2.6".into())
        );
        let later = ids(&["kimi-k2.5", "kimi-k2.12"]);
        assert_eq!(
            choose(&ModelSetting::Auto, &later),
            Choice::Chosen("kimi-k2.12".into()),
            "numbers, not strings"
        );
    }

    #[test]
    fn auto_never_picks_a_retired_preview() {
        let listed = ids(&[
            "kimi-k2-turbo-preview",
            "kimi-k2-0905-preview",
            "kimi-latest",
        ]);
        let c = choose(&ModelSetting::Auto, &listed);
        assert_eq!(c, Choice::NoK2);
        assert!(c.problem(&listed).unwrap().contains("kimi-latest"));
    }

    #[test]
    fn an_explicit_id_is_used_only_while_listed() {
        let s = ModelSetting::parse("kimi-k2-turbo-preview");
        let listed = ids(&["kimi-k2.6"]);
        let c = choose(&s, &listed);
        assert_eq!(c, Choice::Unlisted("kimi-k2-turbo-preview".into()));
        assert!(c.problem(&listed).unwrap().contains("not offered"));
        assert_eq!(
            choose(&ModelSetting::parse("kimi-k2.5"), &ids(&["kimi-k2.5"])),
            Choice::Chosen("kimi-k2.5".into())
        );
        assert_eq!(ModelSetting::parse("AUTO"), ModelSetting::Auto);
    }

    #[test]
    fn a_thinking_model_gets_the_reasoning_budget_on_top_of_at_least_min_answer_tokens() {
        assert_eq!(max_tokens(Some(16), true, 256, 4096), 256 + 4096);
        assert_eq!(max_tokens(Some(1000), true, 256, 4096), 1000 + 4096);
        assert_eq!(max_tokens(None, true, 256, 4096), 256 + 4096);
        assert_eq!(max_tokens(Some(16), false, 256, 4096), 16);
        assert_eq!(max_tokens(None, false, 256, 4096), 256);
    }

    #[test]
    fn k2_5_and_later_think_by_default_and_fix_their_sampling() {
        let t = Traits::of("kimi-k2.6");
        assert!(t.thinking_switch && t.fixed_sampling && !t.always_thinks);
        assert!(t.thinks(None) && t.thinks(Some(true)) && !t.thinks(Some(false)));
        assert!(Traits::of("kimi-k2.5-preview").thinking_switch);
        let old = Traits::of("moonshot-v1-8k");
        assert!(!old.thinks(None) && !old.fixed_sampling);
        assert!(Traits::of("kimi-k2-thinking-turbo").thinks(Some(false)));
    }
}
