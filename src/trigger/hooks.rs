//! The webhooks this replica serves: every CohortTrigger in the watched namespaces, its
//! token read from its Secret, keyed by its path. Every replica keeps its own (any replica
//! may answer a call), and each writes the same `status.webhookPath` and `Ready` — only
//! when they differ from what the trigger shows, so replicas agree without writing twice.

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::core::Selector;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::signature::{MIN_TOKEN_CHARS, webhook_path};
use crate::api::{CohortTrigger, READY, TriggerType};
use crate::secret::SecretString;
use crate::source::SourceError;
use crate::source::kube::KubeObjects;

/// How often tokens are read again, so a rotated Secret takes effect without an edit of
/// the trigger.
const TOKEN_REFRESH: Duration = Duration::from_secs(60);

/// One served webhook.
pub struct Hook {
    pub namespace: String,
    pub name: String,
    /// The trigger object and spec it was built from.
    uid: Option<String>,
    generation: Option<i64>,
    pub kind: TriggerType,
    pub token: SecretString,
    /// `spec.selector` as a label selector string for the API server.
    pub selector: String,
    pub events: Vec<String>,
}

/// Path → webhook, and whether it has been built from a full list of the triggers yet.
#[derive(Default)]
pub struct Hooks {
    by_path: RwLock<HashMap<String, Arc<Hook>>>,
    ready: AtomicBool,
}

impl Hooks {
    pub fn get(&self, path: &str) -> Option<Arc<Hook>> {
        self.by_path.read().expect("hooks lock").get(path).cloned()
    }

    /// Until the triggers were listed once, a path not known is not yet "no trigger".
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn replace(&self, hooks: HashMap<String, Arc<Hook>>) {
        *self.by_path.write().expect("hooks lock") = hooks;
    }

    /// The hook served for `trigger` as it is now (same object, same spec), if any.
    fn of(&self, trigger: &CohortTrigger) -> Option<(String, Arc<Hook>)> {
        let hooks = self.by_path.read().expect("hooks lock");
        let same = |h: &Hook| h.uid == trigger.uid() && h.generation == trigger.metadata.generation;
        hooks.iter().find(|(_, h)| same(h)).map(|(p, h)| (p.clone(), h.clone()))
    }
}

/// Why a trigger serves no webhook, as its `Ready` condition says.
#[derive(Debug, thiserror::Error)]
enum Unserved {
    #[error("Secret {name} or its key {key} is not there; create it with the token (spec.secretRef)")]
    SecretNotFound { name: String, key: String },
    #[error("the Secret {name} could not be read: {message}")]
    SecretReadFailed { name: String, message: String },
    #[error(
        "the token in Secret {name} key {key} has fewer than {MIN_TOKEN_CHARS} characters; use a random one, e.g. `openssl rand -hex 32`"
    )]
    TokenTooShort { name: String, key: String },
    #[error("the value of Secret {name} key {key} is not text; put the token there as text")]
    TokenNotText { name: String, key: String },
    #[error("spec.selector is not a valid label selector: {0}")]
    InvalidSelector(String),
}

impl Unserved {
    const fn reason(&self) -> &'static str {
        match self {
            Unserved::SecretNotFound { .. } => "SecretNotFound",
            Unserved::SecretReadFailed { .. } => "SecretReadFailed",
            Unserved::TokenTooShort { .. } => "TokenTooShort",
            Unserved::TokenNotText { .. } => "TokenNotText",
            Unserved::InvalidSelector(_) => "InvalidSelector",
        }
    }
}

/// Keeps `hooks` equal to the CohortTriggers of `namespaces` (all when empty) until dropped.
/// Rebuilt when a trigger appears, goes or changes its spec (not on status writes, which
/// every accepted call makes), and every [`TOKEN_REFRESH`] for rotated tokens.
pub async fn keep(client: Client, namespaces: Vec<String>, hooks: Arc<Hooks>) {
    let apis: Vec<Api<CohortTrigger>> = if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces.iter().map(|ns| Api::namespaced(client.clone(), ns)).collect()
    };
    let scopes = apis.len();
    let mut stores = Vec::new();
    let mut events = Vec::new();
    for api in apis {
        let (reader, writer) = reflector::store();
        stores.push(reader.clone());
        let stream = reflector(writer, watcher(api, watcher::Config::default()).default_backoff());
        events.push(stream.boxed());
    }
    let mut events = futures::stream::select_all(events);
    let mut refresh = tokio::time::interval(TOKEN_REFRESH);
    let (mut listed, mut shown) = (0, None);
    loop {
        let refreshing = tokio::select! {
            Some(event) = events.next() => {
                match event {
                    Ok(watcher::Event::InitDone) => listed += 1,
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "watching CohortTriggers failed (is crds/cohorttriggers.cohorts.dev.yaml applied, and may the operator list them?); retrying"),
                }
                false
            }
            _ = refresh.tick() => true,
        };
        if listed < scopes {
            continue;
        }
        let triggers: Vec<Arc<CohortTrigger>> = stores.iter().flat_map(|s| s.state()).collect();
        let specs: BTreeSet<(String, Option<i64>)> =
            triggers.iter().map(|t| (t.uid().unwrap_or_default(), t.metadata.generation)).collect();
        if refreshing || shown.as_ref() != Some(&specs) {
            let rebuilt = rebuild(&client, &triggers, &hooks).await;
            hooks.replace(rebuilt);
            hooks.ready.store(true, Ordering::Relaxed);
            shown = Some(specs);
        }
    }
}

/// The webhooks of `triggers`, each trigger's status brought up to date on the way. A
/// trigger whose Secret could not be read just now (the API server did not answer) keeps
/// the hook it had (`served`), if its spec is the same.
async fn rebuild(client: &Client, triggers: &[Arc<CohortTrigger>], served: &Hooks) -> HashMap<String, Arc<Hook>> {
    let mut hooks = HashMap::new();
    for trigger in triggers {
        let namespace = trigger.namespace().unwrap_or_default();
        let found = hook(client, trigger, &namespace).await;
        if let Err(Unserved::SecretReadFailed { .. }) = &found
            && let Some((path, kept)) = served.of(trigger)
        {
            hooks.insert(path, kept);
            continue;
        }
        let path = found.as_ref().ok().map(|hook| webhook_path(hook.token.expose().as_bytes(), &hook.name, &namespace));
        if let Err(e) = write_status(client, trigger, path.as_deref(), found.as_ref().err()).await {
            warn!(namespace, trigger = trigger.name_any(), error = %e, "could not write the CohortTrigger's status");
        }
        if let (Ok(hook), Some(path)) = (found, path) {
            hooks.insert(path, Arc::new(hook));
        }
    }
    hooks
}

async fn hook(client: &Client, trigger: &CohortTrigger, namespace: &str) -> Result<Hook, Unserved> {
    let spec = &trigger.spec;
    let selector = Selector::try_from(spec.selector.clone()).map_err(|e| Unserved::InvalidSelector(e.to_string()))?;
    let (name, key) = (spec.secret_ref.name.clone(), spec.secret_ref.key.clone());
    let objects = KubeObjects::new(client.clone(), namespace);
    let token = match objects.secret_value_at(&name, &key).await {
        Ok((token, _)) => token,
        Err(SourceError::ObjectNotFound { .. } | SourceError::KeyNotFound { .. }) => {
            return Err(Unserved::SecretNotFound { name, key });
        }
        Err(SourceError::KeyNotText { .. }) => return Err(Unserved::TokenNotText { name, key }),
        Err(e) => return Err(Unserved::SecretReadFailed { name, message: e.to_string() }),
    };
    let token = SecretString::new(token.expose().trim());
    if token.expose().chars().count() < MIN_TOKEN_CHARS {
        return Err(Unserved::TokenTooShort { name, key });
    }
    Ok(Hook {
        namespace: namespace.to_owned(),
        name: trigger.name_any(),
        uid: trigger.uid(),
        generation: trigger.metadata.generation,
        kind: spec.kind,
        token,
        selector: selector.to_string(),
        events: spec.events.clone(),
    })
}

/// Sets `webhookPath` and `Ready` when they differ from what `trigger` shows.
async fn write_status(
    client: &Client,
    trigger: &CohortTrigger,
    path: Option<&str>,
    unserved: Option<&Unserved>,
) -> Result<(), kube::Error> {
    let (status, reason, message) = match unserved {
        None => ("True", "Ready", "the webhook is served at status.webhookPath".to_owned()),
        Some(e) => ("False", e.reason(), e.to_string()),
    };
    let generation = trigger.metadata.generation;
    let shown = trigger.status.as_ref();
    let ready = shown.and_then(|s| s.conditions.iter().find(|c| c.type_ == READY));
    let same = ready.is_some_and(|c| {
        c.status == status && c.reason == reason && c.message == message && c.observed_generation == generation
    }) && shown.and_then(|s| s.webhook_path.as_deref()) == path;
    if same {
        return Ok(());
    }
    let since = match ready {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(crate::controller::status::seconds(Timestamp::now())),
    };
    let condition = Condition {
        type_: READY.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    };
    let namespace = trigger.namespace().unwrap_or_default();
    let api: Api<CohortTrigger> = Api::namespaced(client.clone(), &namespace);
    let patch = json!({
        "status": { "observedGeneration": generation, "webhookPath": path, "conditions": [condition] }
    });
    api.patch_status(&trigger.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    info!(namespace, trigger = trigger.name_any(), reason, "CohortTrigger status written");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unserved_triggers_say_what_to_fix_without_the_token() {
        let short = Unserved::TokenTooShort { name: "hook".into(), key: "token".into() };
        assert_eq!(short.reason(), "TokenTooShort");
        assert!(short.to_string().contains("openssl rand"), "{short}");
        let missing = Unserved::SecretNotFound { name: "hook".into(), key: "token".into() };
        assert!(missing.to_string().contains("spec.secretRef"), "{missing}");
    }
}
