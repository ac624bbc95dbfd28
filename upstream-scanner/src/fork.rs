//! Keeping the fork's clone in step with upstream: fetch, ahead/behind, fast-forward only,
//! optional non-forced push. A fork whose branch has its own commits is reported, never
//! rewritten.

use std::cell::RefCell;

use git2::{
    build::CheckoutBuilder, Cred, CredentialType, FetchOptions, Oid, PushOptions, RemoteCallbacks,
    Repository,
};
use serde::{Deserialize, Serialize};

use crate::config::{ForkConfig, GitHubToken, RepoName};

/// Credential prompts answered per network operation. libgit2 asks again after every
/// rejected credential, so without a bound a wrong token loops forever.
pub const MAX_CREDENTIAL_ATTEMPTS: u32 = 3;

/// Where a branch stands against upstream's branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Divergence {
    /// Commits on the branch that upstream lacks.
    pub ahead: usize,
    /// Upstream commits the branch lacks.
    pub behind: usize,
}

impl Divergence {
    pub fn is_diverged(&self) -> bool {
        self.ahead > 0 && self.behind > 0
    }
}

/// What the sync did to the local branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LocalAction {
    UpToDate,
    /// The branch only has commits of its own; nothing to take from upstream.
    AheadOnly,
    FastForwarded {
        from: String,
        to: String,
        commits: usize,
    },
    /// Both sides have commits: left untouched for a person to rebase or merge.
    Diverged,
    /// A fast-forward was possible but the working tree would lose changes.
    Blocked {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PushOutcome {
    Pushed {
        commits: usize,
    },
    UpToDate,
    /// Not attempted: the fork's branch has commits the local branch lacks.
    Skipped {
        reason: String,
    },
    Rejected {
        reason: String,
    },
    Failed {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkStatus {
    pub fork: RepoName,
    pub branch: String,
    pub upstream_head: String,
    /// The fork on GitHub (its remote-tracking branch) against upstream, after any push.
    /// `None` when the fork's remote could not be fetched.
    pub fork_remote: Option<Divergence>,
    /// Why the fork's remote state is missing, when it is.
    pub fork_remote_error: Option<String>,
    /// The local branch against upstream before and after the sync.
    pub local_before: Divergence,
    pub local_after: Divergence,
    pub action: LocalAction,
    pub push: Option<PushOutcome>,
}

#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    #[error("cannot open the fork's clone at {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        source: git2::Error,
    },
    #[error("fetching upstream from {url}: {source}")]
    FetchUpstream { url: String, source: git2::Error },
    #[error("upstream has no branch `{0}`")]
    NoUpstreamBranch(String),
    #[error("the clone has no local branch `{0}`")]
    NoLocalBranch(String),
    #[error("git: {0}")]
    Git(#[from] git2::Error),
}

/// Answers libgit2's credential prompts, at most `max` times.
pub struct CredentialGate {
    token: Option<GitHubToken>,
    attempts: u32,
    max: u32,
}

impl std::fmt::Debug for CredentialGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialGate")
            .field("has_token", &self.token.is_some())
            .field("attempts", &self.attempts)
            .field("max", &self.max)
            .finish()
    }
}

impl CredentialGate {
    pub fn new(token: Option<GitHubToken>, max: u32) -> Self {
        Self {
            token,
            attempts: 0,
            max,
        }
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// One credential prompt: the token over HTTPS (GitHub takes any user name with a
    /// token as password), the SSH agent, or the platform default.
    pub fn attempt(
        &mut self,
        url: &str,
        username: Option<&str>,
        allowed: CredentialType,
    ) -> Result<Cred, git2::Error> {
        self.attempts += 1;
        if self.attempts > self.max {
            return Err(git2::Error::from_str(&format!(
                "giving up on credentials for {url} after {} attempts",
                self.max
            )));
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            if let Some(token) = &self.token {
                return Cred::userpass_plaintext("x-access-token", token.expose());
            }
        }
        if allowed.contains(CredentialType::SSH_KEY) {
            return Cred::ssh_key_from_agent(username.unwrap_or("git"));
        }
        if allowed.contains(CredentialType::DEFAULT) {
            return Cred::default();
        }
        Err(git2::Error::from_str(&format!(
            "no usable credential for {url} (configure a token)"
        )))
    }
}

fn callbacks<'a>(gate: &'a RefCell<CredentialGate>) -> RemoteCallbacks<'a> {
    let mut cb = RemoteCallbacks::new();
    cb.credentials(move |url, username, allowed| gate.borrow_mut().attempt(url, username, allowed));
    cb
}

/// Synchronises the local clone of the fork with upstream.
pub fn sync(
    config: &ForkConfig,
    upstream: &RepoName,
    upstream_branch: &str,
    token: Option<&GitHubToken>,
) -> Result<ForkStatus, ForkError> {
    let repo = Repository::open(&config.clone).map_err(|source| ForkError::Open {
        path: config.clone.clone(),
        source,
    })?;
    let upstream_url = config
        .upstream_url
        .clone()
        .unwrap_or_else(|| upstream.github_url());
    let upstream_ref = format!("refs/remotes/upstream/{upstream_branch}");
    let fork_ref = format!("refs/remotes/{}/{}", config.remote, config.branch);
    let local_ref = format!("refs/heads/{}", config.branch);

    // Upstream: an anonymous remote, so the clone's configuration is left as it is.
    {
        let gate = RefCell::new(CredentialGate::new(token.cloned(), MAX_CREDENTIAL_ATTEMPTS));
        let mut opts = FetchOptions::new();
        opts.remote_callbacks(callbacks(&gate));
        let mut remote =
            repo.remote_anonymous(&upstream_url)
                .map_err(|source| ForkError::FetchUpstream {
                    url: upstream_url.clone(),
                    source,
                })?;
        remote
            .fetch(
                &[format!("+refs/heads/{upstream_branch}:{upstream_ref}")],
                Some(&mut opts),
                None,
            )
            .map_err(|source| ForkError::FetchUpstream {
                url: upstream_url.clone(),
                source,
            })?;
    }
    let upstream_oid = repo
        .refname_to_id(&upstream_ref)
        .map_err(|_| ForkError::NoUpstreamBranch(upstream_branch.to_owned()))?;

    // The fork's own remote: a failure here still leaves the local sync meaningful.
    let fork_fetch_error = fetch_named(&repo, &config.remote, &config.branch, token).err();

    let local_oid = repo
        .refname_to_id(&local_ref)
        .map_err(|_| ForkError::NoLocalBranch(config.branch.clone()))?;
    let local_before = divergence(&repo, local_oid, upstream_oid)?;

    let action = if local_oid == upstream_oid {
        LocalAction::UpToDate
    } else if local_before.is_diverged() {
        LocalAction::Diverged
    } else if local_before.behind == 0 {
        LocalAction::AheadOnly
    } else {
        match fast_forward(&repo, &local_ref, local_oid, upstream_oid) {
            Ok(()) => LocalAction::FastForwarded {
                from: local_oid.to_string(),
                to: upstream_oid.to_string(),
                commits: local_before.behind,
            },
            Err(reason) => LocalAction::Blocked { reason },
        }
    };
    let local_now = repo.refname_to_id(&local_ref)?;
    let local_after = divergence(&repo, local_now, upstream_oid)?;

    // Only upstream's own history goes to the fork: local-only commits are for a person
    // to push.
    let push = if !config.push {
        None
    } else if fork_fetch_error.is_some() {
        Some(PushOutcome::Skipped {
            reason: "the fork's remote could not be fetched".into(),
        })
    } else if local_now != upstream_oid {
        Some(PushOutcome::Skipped {
            reason: format!("the local `{}` is not at upstream's head", config.branch),
        })
    } else {
        Some(push_branch(&repo, config, &fork_ref, local_now, token))
    };

    let fork_remote = match repo.refname_to_id(&fork_ref) {
        Ok(oid) if fork_fetch_error.is_none() => Some(divergence(&repo, oid, upstream_oid)?),
        _ => None,
    };
    let fork_remote_error = match (&fork_fetch_error, fork_remote) {
        (Some(e), _) => Some(format!("fetching remote `{}`: {e}", config.remote)),
        (None, None) => Some(format!(
            "remote `{}` has no branch `{}`",
            config.remote, config.branch
        )),
        (None, Some(_)) => None,
    };

    Ok(ForkStatus {
        fork: config.repo.clone(),
        branch: config.branch.clone(),
        upstream_head: upstream_oid.to_string(),
        fork_remote,
        fork_remote_error,
        local_before,
        local_after,
        action,
        push,
    })
}

fn divergence(repo: &Repository, branch: Oid, upstream: Oid) -> Result<Divergence, git2::Error> {
    let (ahead, behind) = repo.graph_ahead_behind(branch, upstream)?;
    Ok(Divergence { ahead, behind })
}

fn fetch_named(
    repo: &Repository,
    remote: &str,
    branch: &str,
    token: Option<&GitHubToken>,
) -> Result<(), git2::Error> {
    let gate = RefCell::new(CredentialGate::new(token.cloned(), MAX_CREDENTIAL_ATTEMPTS));
    let mut opts = FetchOptions::new();
    opts.remote_callbacks(callbacks(&gate));
    repo.find_remote(remote)?.fetch(
        &[format!(
            "+refs/heads/{branch}:refs/remotes/{remote}/{branch}"
        )],
        Some(&mut opts),
        None,
    )
}

/// Moves `local_ref` from `from` to its descendant `to`. When the branch is checked out,
/// the working tree is updated first with a safe checkout, which refuses to overwrite
/// local changes.
fn fast_forward(repo: &Repository, local_ref: &str, from: Oid, to: Oid) -> Result<(), String> {
    if !repo
        .graph_descendant_of(to, from)
        .map_err(|e| e.to_string())?
    {
        return Err("not a fast-forward".into());
    }
    let checked_out = !repo.is_bare()
        && repo
            .head()
            .ok()
            .and_then(|h| h.name().ok().map(|n| n == local_ref))
            .unwrap_or(false);
    if checked_out {
        let target = repo.find_commit(to).map_err(|e| e.to_string())?;
        repo.checkout_tree(target.as_object(), Some(CheckoutBuilder::new().safe()))
            .map_err(|e| format!("the working tree has local changes in the way: {e}"))?;
    }
    // Compare-and-swap: only moves the branch if nobody moved it since we read it.
    repo.reference_matching(
        local_ref,
        to,
        true,
        from,
        &format!("cathedral upstream: fast-forward to {to}"),
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

fn push_branch(
    repo: &Repository,
    config: &ForkConfig,
    fork_ref: &str,
    local: Oid,
    token: Option<&GitHubToken>,
) -> PushOutcome {
    let fork_oid = match repo.refname_to_id(fork_ref) {
        Ok(oid) => oid,
        Err(e) => {
            return PushOutcome::Failed {
                reason: e.to_string(),
            }
        }
    };
    if fork_oid == local {
        return PushOutcome::UpToDate;
    }
    match repo.graph_descendant_of(local, fork_oid) {
        Ok(true) => {}
        Ok(false) => {
            return PushOutcome::Skipped {
                reason: format!(
                    "`{}` on the fork has commits the local branch lacks; not forcing",
                    config.branch
                ),
            }
        }
        Err(e) => {
            return PushOutcome::Failed {
                reason: e.to_string(),
            }
        }
    }
    let commits = repo
        .graph_ahead_behind(local, fork_oid)
        .map(|(a, _)| a)
        .unwrap_or(0);
    let gate = RefCell::new(CredentialGate::new(token.cloned(), MAX_CREDENTIAL_ATTEMPTS));
    let rejection: RefCell<Option<String>> = RefCell::new(None);
    let result = {
        let mut cb = callbacks(&gate);
        cb.push_update_reference(|refname, status| {
            if let Some(msg) = status {
                *rejection.borrow_mut() = Some(format!("{refname}: {msg}"));
            }
            Ok(())
        });
        let mut opts = PushOptions::new();
        opts.remote_callbacks(cb);
        // No leading `+`: the remote refuses anything but a fast-forward.
        let spec = format!("refs/heads/{0}:refs/heads/{0}", config.branch);
        repo.find_remote(&config.remote)
            .and_then(|mut remote| remote.push(&[spec], Some(&mut opts)))
    };
    match (result, rejection.into_inner()) {
        (Err(e), _) => PushOutcome::Failed {
            reason: e.to_string(),
        },
        (Ok(()), Some(reason)) => PushOutcome::Rejected { reason },
        (Ok(()), None) => {
            // Keep the remote-tracking branch in step with what the fork now holds.
            let _ = repo.reference(fork_ref, local, true, "cathedral upstream: pushed");
            PushOutcome::Pushed { commits }
        }
    }
}
