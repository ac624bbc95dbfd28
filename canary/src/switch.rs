//! Carrying out a kill-switch decision: through the runtime's admin route (remote watcher,
//! admin client certificate) or by writing the kill-switch file (watcher on the same host).
use crate::policy::{Decision, KillSwitchEvent, SwitchAction};
use cathedral_runtime::killswitch::KillSwitch;
use chrono::Utc;
use std::path::PathBuf;
use std::time::Duration;

/// Who the kill-switch file names as having engaged it (file target; through the admin route
/// the runtime records the certificate's identity).
pub const ENGAGED_BY: &str = "canary";

/// Where the watcher flips the switch.
#[derive(Debug, Clone)]
pub enum SwitchTarget {
    /// `POST`/`DELETE {base}/admin/kill-switch` with a client whose certificate is an admin identity.
    Admin {
        client: reqwest::Client,
        base: String,
    },
    /// The runtime's kill-switch file, on this host.
    File(PathBuf),
    /// Record decisions only (dry run).
    None,
}

impl SwitchTarget {
    pub fn describe(&self) -> String {
        match self {
            SwitchTarget::Admin { base, .. } => format!("admin {base}/admin/kill-switch"),
            SwitchTarget::File(path) => format!("file {}", path.display()),
            SwitchTarget::None => "none (dry run)".to_owned(),
        }
    }

    /// Carries out `decision`; the returned event says whether it took effect.
    pub async fn apply(&self, decision: &Decision) -> KillSwitchEvent {
        let error = match self {
            SwitchTarget::Admin { client, base } => admin(client, base, decision).await.err(),
            SwitchTarget::File(path) => {
                let ks = KillSwitch::new(path);
                let result = match decision.action {
                    SwitchAction::Engage => ks.engage(ENGAGED_BY, &decision.reason).map(|_| ()),
                    SwitchAction::Release => ks.release().map(|_| ()),
                };
                result.err().map(|e| e.to_string())
            }
            SwitchTarget::None => Some("no kill-switch target configured (dry run)".to_owned()),
        };
        KillSwitchEvent {
            at: Utc::now(),
            action: decision.action,
            via: self.describe(),
            windows: decision.windows.clone(),
            reason: decision.reason.clone(),
            error,
        }
    }
}

async fn admin(client: &reqwest::Client, base: &str, decision: &Decision) -> Result<(), String> {
    let url = format!("{}/admin/kill-switch", base.trim_end_matches('/'));
    let request = match decision.action {
        // The runtime records the admin certificate's identity as who engaged it.
        SwitchAction::Engage => client.post(&url).json(&serde_json::json!({
            "reason": cathedral_reason(&decision.reason),
        })),
        SwitchAction::Release => client.delete(&url),
    };
    let response = request
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        let body = response.text().await.unwrap_or_default();
        Err(format!(
            "{url} answered {status}: {}",
            body.chars().take(300).collect::<String>()
        ))
    }
}

/// The runtime bounds the reason it stores; keep the head (it names the windows).
fn cathedral_reason(reason: &str) -> String {
    let max = cathedral_runtime::killswitch::MAX_REASON_CHARS;
    if reason.chars().count() <= max {
        reason.to_owned()
    } else {
        let mut s: String = reason.chars().take(max - 1).collect();
        s.push('…');
        s
    }
}

/// Runs the operator's `--notify` command for an event: `sh -c CMD` with the event in the
/// environment, bounded in time; its failure is logged, never fatal.
pub async fn notify(command: &str, event: &KillSwitchEvent, timeout: Duration) {
    let windows = event
        .windows
        .iter()
        .map(|w| w.to_rfc3339())
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env(
            "CATHEDRAL_CANARY_ACTION",
            match event.action {
                SwitchAction::Engage => "engage",
                SwitchAction::Release => "release",
            },
        )
        .env(
            "CATHEDRAL_CANARY_OK",
            if event.succeeded() { "1" } else { "0" },
        )
        .env("CATHEDRAL_CANARY_REASON", &event.reason)
        .env("CATHEDRAL_CANARY_WINDOWS", windows)
        .env("CATHEDRAL_CANARY_VIA", &event.via)
        .env(
            "CATHEDRAL_CANARY_EVENT",
            serde_json::to_string(event).unwrap_or_default(),
        )
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(timeout, cmd.status()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => tracing::warn!(%status, command, "notify command failed"),
        Ok(Err(e)) => tracing::warn!(error = %e, command, "notify command could not start"),
        Err(_) => tracing::warn!(?timeout, command, "notify command timed out and was killed"),
    }
}
