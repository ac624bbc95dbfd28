//! Fork sync against real repositories: bare "upstream" and "fork" repositories on disk, a
//! clone of the fork, and commits made here.

use std::path::{Path, PathBuf};

use cathedral_upstream_scanner::config::{ForkConfig, GitHubToken, RepoName};
use cathedral_upstream_scanner::fork::{
    self, CredentialGate, Divergence, LocalAction, PushOutcome, MAX_CREDENTIAL_ATTEMPTS,
};
use git2::{CredentialType, Oid, Repository, RepositoryInitOptions, Signature};

struct World {
    _dir: tempfile::TempDir,
    upstream: PathBuf,
    fork: PathBuf,
    clone: PathBuf,
    /// A working repository standing for upstream's maintainers.
    maintainer: Repository,
}

fn init(path: &Path, bare: bool) -> Repository {
    let mut opts = RepositoryInitOptions::new();
    opts.bare(bare).initial_head("main");
    Repository::init_opts(path, &opts).unwrap()
}

/// Writes `file` and commits it on the checked-out branch.
fn commit(repo: &Repository, file: &str, content: &str, message: &str) -> Oid {
    let workdir = repo.workdir().unwrap();
    std::fs::write(workdir.join(file), content).unwrap();
    let mut index = repo.index().unwrap();
    index.add_path(Path::new(file)).unwrap();
    index.write().unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = Signature::now("Test", "test@example.invalid").unwrap();
    let parents: Vec<git2::Commit> = repo
        .head()
        .ok()
        .and_then(|h| h.target())
        .map(|oid| vec![repo.find_commit(oid).unwrap()])
        .unwrap_or_default();
    let parents: Vec<&git2::Commit> = parents.iter().collect();
    repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)
        .unwrap()
}

fn push(repo: &Repository, to: &Path, spec: &str) {
    let mut remote = repo.remote_anonymous(to.to_str().unwrap()).unwrap();
    remote.push(&[spec], None).unwrap();
}

fn head_of(bare: &Path, branch: &str) -> Oid {
    Repository::open(bare)
        .unwrap()
        .refname_to_id(&format!("refs/heads/{branch}"))
        .unwrap()
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let upstream = dir.path().join("upstream.git");
    let fork = dir.path().join("fork.git");
    let clone = dir.path().join("clone");
    init(&upstream, true);
    init(&fork, true);
    let maintainer = init(&dir.path().join("maintainer"), false);
    commit(&maintainer, "README.md", "mlx-rs\n", "initial");
    commit(&maintainer, "src.rs", "fn a() {}\n", "second");
    push(&maintainer, &upstream, "refs/heads/main:refs/heads/main");
    // The fork starts as a copy of upstream.
    push(&maintainer, &fork, "refs/heads/main:refs/heads/main");
    Repository::clone(fork.to_str().unwrap(), &clone).unwrap();
    World {
        _dir: dir,
        upstream,
        fork,
        clone,
        maintainer,
    }
}

fn fork_config(w: &World, push: bool) -> ForkConfig {
    ForkConfig {
        repo: "us/mlx-rs".parse().unwrap(),
        clone: w.clone.clone(),
        remote: "origin".into(),
        branch: "main".into(),
        upstream_url: Some(w.upstream.to_str().unwrap().to_owned()),
        push,
    }
}

fn upstream_name() -> RepoName {
    "oxiglade/mlx-rs".parse().unwrap()
}

#[test]
fn up_to_date_fork_reports_zero_zero() {
    let w = world();
    let status = fork::sync(&fork_config(&w, false), &upstream_name(), "main", None).unwrap();
    assert_eq!(status.action, LocalAction::UpToDate);
    let even = Divergence {
        ahead: 0,
        behind: 0,
    };
    assert_eq!(status.local_before, even);
    assert_eq!(status.local_after, even);
    assert_eq!(status.fork_remote, Some(even));
    assert_eq!(status.fork_remote_error, None);
    assert_eq!(status.push, None);
}

#[test]
fn behind_fork_is_fast_forwarded_checked_out_and_pushed() {
    let w = world();
    commit(&w.maintainer, "src.rs", "fn a() {}\nfn b() {}\n", "third");
    let new_head = commit(&w.maintainer, "CHANGELOG.md", "0.2\n", "fourth");
    push(
        &w.maintainer,
        &w.upstream,
        "refs/heads/main:refs/heads/main",
    );

    let status = fork::sync(&fork_config(&w, true), &upstream_name(), "main", None).unwrap();
    assert_eq!(
        status.local_before,
        Divergence {
            ahead: 0,
            behind: 2
        }
    );
    assert_eq!(
        status.local_after,
        Divergence {
            ahead: 0,
            behind: 0
        }
    );
    match &status.action {
        LocalAction::FastForwarded { to, commits, .. } => {
            assert_eq!(*commits, 2);
            assert_eq!(to, &new_head.to_string());
        }
        other => panic!("expected a fast-forward, got {other:?}"),
    }
    assert_eq!(status.upstream_head, new_head.to_string());
    // The checked-out branch moved with its working tree.
    let clone = Repository::open(&w.clone).unwrap();
    assert_eq!(clone.head().unwrap().target(), Some(new_head));
    assert_eq!(
        std::fs::read_to_string(w.clone.join("CHANGELOG.md")).unwrap(),
        "0.2\n"
    );
    assert!(
        clone.statuses(None).unwrap().is_empty(),
        "clean after checkout"
    );
    // And the fork on "GitHub" now has it too, pushed without force.
    assert_eq!(status.push, Some(PushOutcome::Pushed { commits: 2 }));
    assert_eq!(head_of(&w.fork, "main"), new_head);
    assert_eq!(
        status.fork_remote,
        Some(Divergence {
            ahead: 0,
            behind: 0
        })
    );

    // A second sync has nothing to do.
    let again = fork::sync(&fork_config(&w, true), &upstream_name(), "main", None).unwrap();
    assert_eq!(again.action, LocalAction::UpToDate);
    assert_eq!(again.push, Some(PushOutcome::UpToDate));
}

#[test]
fn diverged_local_branch_is_reported_not_forced() {
    let w = world();
    let clone = Repository::open(&w.clone).unwrap();
    let ours = commit(&clone, "ours.rs", "// local work\n", "our change");
    commit(
        &w.maintainer,
        "theirs.rs",
        "// upstream work\n",
        "their change 1",
    );
    commit(
        &w.maintainer,
        "theirs.rs",
        "// upstream work 2\n",
        "their change 2",
    );
    push(
        &w.maintainer,
        &w.upstream,
        "refs/heads/main:refs/heads/main",
    );
    let fork_before = head_of(&w.fork, "main");

    let status = fork::sync(&fork_config(&w, true), &upstream_name(), "main", None).unwrap();
    assert_eq!(status.action, LocalAction::Diverged);
    assert_eq!(
        status.local_before,
        Divergence {
            ahead: 1,
            behind: 2
        }
    );
    assert_eq!(
        status.local_after,
        Divergence {
            ahead: 1,
            behind: 2
        }
    );
    // Untouched: branch, working tree, and the fork.
    assert_eq!(clone.refname_to_id("refs/heads/main").unwrap(), ours);
    assert!(w.clone.join("ours.rs").exists());
    assert!(!w.clone.join("theirs.rs").exists());
    assert!(matches!(status.push, Some(PushOutcome::Skipped { .. })));
    assert_eq!(head_of(&w.fork, "main"), fork_before);
    // The fork on GitHub itself is merely behind.
    assert_eq!(
        status.fork_remote,
        Some(Divergence {
            ahead: 0,
            behind: 2
        })
    );
}

#[test]
fn fork_remote_with_own_commits_is_not_overwritten() {
    let w = world();
    // Someone committed on the fork's main directly.
    let other = init(&w._dir.path().join("other"), false);
    {
        let mut remote = other.remote_anonymous(w.fork.to_str().unwrap()).unwrap();
        remote
            .fetch(&["refs/heads/main:refs/heads/main"], None, None)
            .unwrap();
        other.set_head("refs/heads/main").unwrap();
        other
            .checkout_head(Some(git2::build::CheckoutBuilder::new().force()))
            .unwrap();
    }
    let fork_only = commit(&other, "fork-only.rs", "// fork\n", "fork-only change");
    push(&other, &w.fork, "refs/heads/main:refs/heads/main");
    commit(
        &w.maintainer,
        "theirs.rs",
        "// upstream\n",
        "upstream change",
    );
    push(
        &w.maintainer,
        &w.upstream,
        "refs/heads/main:refs/heads/main",
    );

    let status = fork::sync(&fork_config(&w, true), &upstream_name(), "main", None).unwrap();
    assert!(matches!(
        status.action,
        LocalAction::FastForwarded { commits: 1, .. }
    ));
    assert!(
        matches!(&status.push, Some(PushOutcome::Skipped { reason }) if reason.contains("not forcing")),
        "{:?}",
        status.push
    );
    assert_eq!(head_of(&w.fork, "main"), fork_only);
    assert_eq!(
        status.fork_remote,
        Some(Divergence {
            ahead: 1,
            behind: 1
        })
    );
}

#[test]
fn local_changes_in_the_way_block_the_fast_forward() {
    let w = world();
    let clone = Repository::open(&w.clone).unwrap();
    let before = clone.refname_to_id("refs/heads/main").unwrap();
    commit(&w.maintainer, "src.rs", "fn a() { upstream }\n", "edit src");
    push(
        &w.maintainer,
        &w.upstream,
        "refs/heads/main:refs/heads/main",
    );
    std::fs::write(w.clone.join("src.rs"), "fn a() { uncommitted }\n").unwrap();

    let status = fork::sync(&fork_config(&w, false), &upstream_name(), "main", None).unwrap();
    assert!(
        matches!(status.action, LocalAction::Blocked { .. }),
        "{:?}",
        status.action
    );
    assert_eq!(clone.refname_to_id("refs/heads/main").unwrap(), before);
    assert_eq!(
        std::fs::read_to_string(w.clone.join("src.rs")).unwrap(),
        "fn a() { uncommitted }\n"
    );
    assert_eq!(
        status.local_after,
        Divergence {
            ahead: 0,
            behind: 1
        }
    );
}

#[test]
fn missing_clone_is_an_error_naming_the_path() {
    let w = world();
    let mut config = fork_config(&w, false);
    config.clone = w._dir.path().join("no-such-clone");
    let err = fork::sync(&config, &upstream_name(), "main", None).unwrap_err();
    assert!(err.to_string().contains("no-such-clone"), "{err}");
}

#[test]
fn credential_callback_gives_up_after_the_bound() {
    let token = GitHubToken::new("ghp_secret_value".into());
    let mut gate = CredentialGate::new(Some(token), MAX_CREDENTIAL_ATTEMPTS);
    let url = "https://github.com/us/mlx-rs.git";
    for _ in 0..MAX_CREDENTIAL_ATTEMPTS {
        assert!(gate
            .attempt(url, None, CredentialType::USER_PASS_PLAINTEXT)
            .is_ok());
    }
    let err = gate
        .attempt(url, None, CredentialType::USER_PASS_PLAINTEXT)
        .err()
        .expect("the gate must refuse past its bound");
    assert!(err.message().contains("giving up"), "{}", err.message());
    assert_eq!(gate.attempts(), MAX_CREDENTIAL_ATTEMPTS + 1);
    // Neither the gate nor the token shows the secret.
    let shown = format!("{gate:?}");
    assert!(!shown.contains("ghp_secret_value"), "{shown}");
}

#[test]
fn credential_callback_without_token_refuses_password_prompts() {
    let mut gate = CredentialGate::new(None, MAX_CREDENTIAL_ATTEMPTS);
    let err = gate
        .attempt(
            "https://github.com/us/mlx-rs.git",
            None,
            CredentialType::USER_PASS_PLAINTEXT,
        )
        .err()
        .expect("no token: no credential");
    assert!(err.message().contains("token"), "{}", err.message());
}
