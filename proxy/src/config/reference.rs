//! The variable table — the one source of every variable's name, topic, default,
//! moment of effect and meaning — and what is made from it: `handoff --help`, the
//! reference in `docs/configuration.md` and the console's `SHOW CONFIG`.
//!
//! Each topic's file declares its own variables next to the code that parses them;
//! [`VARIABLES`] joins them in [`Topic::ALL`]'s order.

use super::values::Vars;
use super::variable::{Applies, Topic, Variable};
use super::Config;

/// Each topic's table, in [`Topic::ALL`]'s order.
const PARTS: [&[Variable]; 12] = [
    super::listen::VARIABLES,
    super::shards::VARIABLES,
    super::auth::VARIABLES,
    super::pools::CLIENT_VARIABLES,
    super::pools::POOL_VARIABLES,
    super::pools::BUFFER_VARIABLES,
    super::replicas::VARIABLES,
    super::switchover::VARIABLES,
    super::coordination::VARIABLES,
    super::patroni::VARIABLES,
    super::pg_auto_failover::VARIABLES,
    super::repmgr::VARIABLES,
];

const COUNT: usize = {
    let mut n = 0;
    let mut i = 0;
    while i < PARTS.len() {
        n += PARTS[i].len();
        i += 1;
    }
    n
};

/// [`PARTS`] joined into one array at compile time.
const JOINED: [Variable; COUNT] = {
    let mut all = [PARTS[0][0]; COUNT];
    let (mut n, mut part) = (0, 0);
    while part < PARTS.len() {
        let mut i = 0;
        while i < PARTS[part].len() {
            all[n] = PARTS[part][i];
            n += 1;
            i += 1;
        }
        part += 1;
    }
    all
};

/// Every variable handoff reads — the one source of their names, defaults and
/// meanings: `handoff --help`, the console's `SHOW CONFIG` and `docs/configuration.md`
/// are made from it. Anything else starting with `HANDOFF_` is refused.
pub const VARIABLES: &[Variable] = &JOINED;

impl Config {
    /// Every variable with its default and meaning, by topic, as `handoff --help`
    /// shows them after the usage.
    pub fn help() -> String {
        let mut s = String::from("Environment variables:\n");
        for topic in Topic::ALL {
            s.push_str(&format!("\n {}:\n", topic.title()));
            for v in VARIABLES.iter().filter(|v| v.topic == topic) {
                let plain = v.help.replace('`', "").replace("**", "");
                s.push_str(&format!(
                    "  {:<30} default {}\n      {plain}\n",
                    v.name, v.default
                ));
            }
        }
        s.push_str("\nDurations are written 250ms, 10s, 1m, 1h.\n");
        s
    }

    /// The configuration reference in Markdown, one table per [`Topic`]: what
    /// `docs/configuration.md` holds between its generated-section markers (a test
    /// checks that it does).
    pub fn reference_markdown() -> String {
        let mut s = String::new();
        for topic in Topic::ALL {
            s.push_str(&format!(
                "### {}\n\n| variable | default | a change applies | meaning |\n|---|---|---|---|\n",
                topic.title()
            ));
            for v in VARIABLES.iter().filter(|v| v.topic == topic) {
                let default = match v.default.strip_prefix('(') {
                    Some(text) => text.trim_end_matches(')').to_string(),
                    None => format!("`{}`", v.default),
                };
                let applies = match v.applies {
                    Applies::Takeover => "on takeover",
                    Applies::Restart => "at restart",
                    Applies::OnSighup => "on SIGHUP",
                };
                s.push_str(&format!(
                    "| `{}` | {} | {applies} | {} |\n",
                    v.name,
                    default.replace('|', "\\|"),
                    v.help.replace('|', "\\|")
                ));
            }
            s.push('\n');
        }
        s
    }
}

/// The settings as the admin console's `SHOW CONFIG` lists them: what was given, else
/// the default; passwords, tokens and the users' secrets are not shown.
pub(super) fn shown_settings(vars: &Vars) -> Vec<(&'static str, String, &'static str)> {
    VARIABLES
        .iter()
        .map(|v| {
            let secret = v.name.contains("PASSWORD")
                || v.name.contains("TOKEN")
                || v.name == "HANDOFF_USERS";
            let value = match vars.given(v.name) {
                Some(_) if secret => "(set, hidden)".to_string(),
                Some(given)
                    if v.name == "HANDOFF_PG_AUTO_FAILOVER" || v.name == "HANDOFF_REPMGR" =>
                {
                    super::pg_auto_failover::hide_password(given)
                }
                Some(given) => given.to_string(),
                None => v.default.to_string(),
            };
            (v.name, value, v.default)
        })
        .collect()
}
