//! Whole scans against a local server that answers GitHub's REST endpoints with
//! responses shaped like GitHub's: ETags and 304s, rate limits, server errors.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Router;
use cathedral_upstream_scanner::config::{
    Config, ForkConfig, GitHubConfig, ScheduleConfig, TokenSource,
};
use cathedral_upstream_scanner::github::{ChecksState, PrState, ReviewDecision};
use cathedral_upstream_scanner::report::{self, Change};
use cathedral_upstream_scanner::{scan, Label, Login, Report};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde_json::{json, Value};

const TOKEN: &str = "ghp_test_token_never_in_reports";
const LOGIN: &str = "octo-dev";
const UPSTREAM: &str = "oxiglade/mlx-rs";
const RELEASES: &str = "ml-explore/mlx";
const HEAD_SHA: &str = "6dcb09b5b57875f334f61aebed695e2e4193db5e";

#[derive(Debug, Clone)]
struct Logged {
    key: String,
    if_none_match: Option<String>,
    authorization: Option<String>,
    status: u16,
}

struct Scripted {
    status: StatusCode,
    headers: Vec<(&'static str, String)>,
    body: Value,
}

#[derive(Default)]
struct Fake {
    base: String,
    fixtures: HashMap<String, Value>,
    scripted: HashMap<String, VecDeque<Scripted>>,
    log: Vec<Logged>,
    remaining: u64,
}

type Shared = Arc<Mutex<Fake>>;

fn etag_of(body: &str) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut h);
    format!("W/\"{:016x}\"", h.finish())
}

/// The fixture key of a request: the path, plus the label and page for issue listings.
fn key_of(path: &str, query: &HashMap<String, String>) -> String {
    let mut key = path.to_owned();
    if let Some(labels) = query.get("labels") {
        key.push_str(&format!("?labels={labels}"));
    }
    if let Some(page) = query.get("page") {
        key.push_str(&format!("&page={page}"));
    }
    key
}

async fn answer(State(fake): State<Shared>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let header = |h: &HeaderMap, n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let if_none_match = header(req.headers(), "if-none-match");
    let authorization = header(req.headers(), "authorization");
    let key = key_of(&path, &query);
    let mut fake = fake.lock().unwrap();
    let reset = (Utc::now().timestamp() + 3600).to_string();

    let mut builder = Response::builder()
        .header("content-type", "application/json; charset=utf-8")
        .header("x-ratelimit-limit", "5000")
        .header("x-ratelimit-reset", &reset)
        .header("x-github-api-version-selected", "2022-11-28");

    let (status, body) = if let Some(s) = fake.scripted.get_mut(&key).and_then(|q| q.pop_front()) {
        for (n, v) in &s.headers {
            builder = builder.header(*n, v);
        }
        (s.status, s.body.to_string())
    } else if path == "/search/issues"
        && query.get("q").map(String::as_str)
            != Some(&format!("repo:{UPSTREAM} is:pr author:{LOGIN}"))
    {
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"message": "Validation Failed"}).to_string(),
        )
    } else if let Some(v) = fake.fixtures.get(&key) {
        let body = v.to_string();
        let etag = etag_of(&body);
        builder = builder.header("etag", &etag);
        if key.contains("labels=help wanted") && !key.contains("page=") {
            let next = format!(
                "<{}/repos/{UPSTREAM}/issues?state=open&labels=help+wanted&per_page=100&page=2>; rel=\"next\", <{}/repos/{UPSTREAM}/issues?state=open&labels=help+wanted&per_page=100&page=2>; rel=\"last\"",
                fake.base, fake.base
            );
            builder = builder.header("link", next);
        }
        if if_none_match.as_deref() == Some(etag.as_str()) {
            (StatusCode::NOT_MODIFIED, String::new())
        } else {
            (StatusCode::OK, body)
        }
    } else {
        (
            StatusCode::NOT_FOUND,
            json!({"message": "Not Found", "documentation_url": "https://docs.github.com/rest"})
                .to_string(),
        )
    };
    if status != StatusCode::NOT_MODIFIED {
        fake.remaining = fake.remaining.saturating_sub(1);
    }
    builder = builder.header("x-ratelimit-remaining", fake.remaining.to_string());
    fake.log.push(Logged {
        key,
        if_none_match,
        authorization,
        status: status.as_u16(),
    });
    builder.status(status).body(Body::from(body)).unwrap()
}

fn user(login: &str, id: u64) -> Value {
    json!({
        "login": login, "id": id, "node_id": "MDQ6VXNlcjE=",
        "avatar_url": format!("https://avatars.githubusercontent.com/u/{id}?v=4"),
        "url": format!("https://api.github.com/users/{login}"),
        "html_url": format!("https://github.com/{login}"),
        "type": "User", "site_admin": false
    })
}

fn label(name: &str) -> Value {
    json!({"id": 208045946, "node_id": "MDU6TGFiZWwyMDgwNDU5NDY=", "url": format!("https://api.github.com/repos/{UPSTREAM}/labels/{name}"), "name": name, "color": "008672", "default": false, "description": ""})
}

fn issue_item(
    number: u64,
    title: &str,
    labels: &[&str],
    pr: Option<Option<&str>>,
    state: &str,
) -> Value {
    let mut v = json!({
        "url": format!("https://api.github.com/repos/{UPSTREAM}/issues/{number}"),
        "repository_url": format!("https://api.github.com/repos/{UPSTREAM}"),
        "html_url": format!("https://github.com/{UPSTREAM}/{}/{number}", if pr.is_some() {"pull"} else {"issues"}),
        "id": 1000 + number, "node_id": "I_kwDOAbc", "number": number, "title": title,
        "user": user(if pr.is_some() { LOGIN } else { "someone" }, 7),
        "labels": labels.iter().map(|l| label(l)).collect::<Vec<_>>(),
        "state": state, "locked": false, "assignee": null, "assignees": [], "milestone": null,
        "comments": 3, "created_at": "2026-10-01T10:00:00Z", "updated_at": "2026-11-20T08:00:00Z",
        "closed_at": null, "author_association": "CONTRIBUTOR", "body": "…", "score": 1.0
    });
    if let Some(merged_at) = pr {
        v["draft"] = json!(false);
        v["pull_request"] = json!({
            "url": format!("https://api.github.com/repos/{UPSTREAM}/pulls/{number}"),
            "html_url": format!("https://github.com/{UPSTREAM}/pull/{number}"),
            "diff_url": format!("https://github.com/{UPSTREAM}/pull/{number}.diff"),
            "patch_url": format!("https://github.com/{UPSTREAM}/pull/{number}.patch"),
            "merged_at": merged_at
        });
    }
    v
}

fn review(id: u64, login: &str, state: &str, at: &str) -> Value {
    json!({
        "id": id, "node_id": "PRR_kwDO", "user": user(login, id), "body": "", "state": state,
        "html_url": format!("https://github.com/{UPSTREAM}/pull/301#pullrequestreview-{id}"),
        "pull_request_url": format!("https://api.github.com/repos/{UPSTREAM}/pulls/301"),
        "author_association": "MEMBER", "submitted_at": at, "commit_id": HEAD_SHA
    })
}

fn release(tag: &str, published: &str, prerelease: bool, draft: bool) -> Value {
    json!({
        "url": format!("https://api.github.com/repos/{RELEASES}/releases/1"),
        "html_url": format!("https://github.com/{RELEASES}/releases/tag/{tag}"),
        "assets_url": format!("https://api.github.com/repos/{RELEASES}/releases/1/assets"),
        "upload_url": format!("https://uploads.github.com/repos/{RELEASES}/releases/1/assets{{?name,label}}"),
        "tarball_url": format!("https://api.github.com/repos/{RELEASES}/tarball/{tag}"),
        "zipball_url": format!("https://api.github.com/repos/{RELEASES}/zipball/{tag}"),
        "id": 1, "node_id": "RE_kwDO", "tag_name": tag, "target_commitish": "main", "name": tag,
        "body": "## Highlights", "draft": draft, "prerelease": prerelease,
        "created_at": published, "published_at": if draft { Value::Null } else { json!(published) },
        "author": user("awni", 9), "assets": []
    })
}

fn fixtures() -> HashMap<String, Value> {
    let mut f = HashMap::new();
    let repo = format!("/repos/{UPSTREAM}");
    f.insert(
        "/search/issues".to_owned(),
        json!({
            "total_count": 2, "incomplete_results": false,
            "items": [
                issue_item(301, "Fix fused attention on CPU backend", &[], Some(None), "open"),
                issue_item(250, "Add safetensors loading for quantized weights", &[], Some(Some("2026-09-14T12:00:00Z")), "closed"),
            ]
        }),
    );
    f.insert(
        format!("{repo}/pulls/301"),
        json!({
            "url": format!("https://api.github.com{repo}/pulls/301"), "id": 2301, "node_id": "PR_kwDO",
            "html_url": format!("https://github.com/{UPSTREAM}/pull/301"), "number": 301,
            "state": "open", "locked": false, "title": "Fix fused attention on CPU backend",
            "user": user(LOGIN, 7), "body": "…", "created_at": "2026-11-01T09:00:00Z",
            "updated_at": "2026-11-20T08:00:00Z", "closed_at": null, "merged_at": null,
            "merge_commit_sha": "e5bd3914e2e596debea16f433f57875b5b90bcd6",
            "assignees": [], "requested_reviewers": [], "labels": [], "draft": false,
            "head": {"label": format!("{LOGIN}:fix-attn"), "ref": "fix-attn", "sha": HEAD_SHA, "user": user(LOGIN, 7)},
            "base": {"label": "oxiglade:main", "ref": "main", "sha": "9049f1265b7d61be4a8904a9a27120d2064dab3b", "user": user("oxiglade", 3)},
            "author_association": "CONTRIBUTOR", "merged": false, "mergeable": true,
            "rebaseable": true, "mergeable_state": "blocked", "merged_by": null, "comments": 4,
            "review_comments": 2, "maintainer_can_modify": true, "commits": 3, "additions": 120,
            "deletions": 14, "changed_files": 5
        }),
    );
    f.insert(
        format!("{repo}/pulls/301/reviews"),
        json!([
            review(80, "dcvz", "APPROVED", "2026-11-10T10:00:00Z"),
            review(
                81,
                "maintainer2",
                "CHANGES_REQUESTED",
                "2026-11-12T10:00:00Z"
            ),
            review(82, "maintainer2", "COMMENTED", "2026-11-13T10:00:00Z"),
            review(83, LOGIN, "COMMENTED", "2026-11-14T10:00:00Z"),
        ]),
    );
    let run = |id: u64, name: &str, conclusion: &str| {
        json!({
            "id": id, "head_sha": HEAD_SHA, "node_id": "CR_kwDO", "external_id": "",
            "url": format!("https://api.github.com{repo}/check-runs/{id}"),
            "html_url": format!("https://github.com/{UPSTREAM}/runs/{id}"),
            "details_url": format!("https://github.com/{UPSTREAM}/actions/runs/{id}"),
            "status": "completed", "conclusion": conclusion,
            "started_at": "2026-11-20T08:01:00Z", "completed_at": "2026-11-20T08:09:00Z",
            "output": {"title": null, "summary": null, "text": null, "annotations_count": 0, "annotations_url": ""},
            "name": name, "check_suite": {"id": 5}, "app": {"id": 15368, "slug": "github-actions", "name": "GitHub Actions"},
            "pull_requests": []
        })
    };
    f.insert(
        format!("{repo}/commits/{HEAD_SHA}/check-runs"),
        json!({"total_count": 2, "check_runs": [run(11, "build (macos-14)", "success"), run(12, "clippy", "failure")]}),
    );
    f.insert(
        format!("{repo}/commits/{HEAD_SHA}/status"),
        json!({
            "state": "success", "sha": HEAD_SHA, "total_count": 1,
            "statuses": [{
                "url": format!("https://api.github.com{repo}/statuses/{HEAD_SHA}"),
                "avatar_url": "https://github.com/images/error/hubot_happy.gif",
                "id": 1, "node_id": "MDY6U3RhdHVzMQ==", "state": "success",
                "description": "Build has completed successfully", "target_url": "https://ci.example.invalid/build/1",
                "context": "ci/docs", "created_at": "2026-11-20T08:01:00Z", "updated_at": "2026-11-20T08:05:00Z"
            }],
            "repository": {"id": 1, "full_name": UPSTREAM},
            "commit_url": format!("https://api.github.com{repo}/commits/{HEAD_SHA}"),
            "url": format!("https://api.github.com{repo}/commits/{HEAD_SHA}/status")
        }),
    );
    f.insert(
        format!("{repo}/issues?labels=help wanted"),
        json!([
            issue_item(
                400,
                "Metal kernel for gather_qmm is slow",
                &["help wanted", "performance"],
                None,
                "open"
            ),
            // The issues list includes pull requests: they must be left out.
            issue_item(
                401,
                "WIP: faster gather_qmm",
                &["help wanted"],
                Some(None),
                "open"
            ),
        ]),
    );
    f.insert(
        format!("{repo}/issues?labels=help wanted&page=2"),
        json!([issue_item(
            395,
            "Document the safetensors loader",
            &["help wanted"],
            None,
            "open"
        )]),
    );
    f.insert(
        format!("{repo}/issues?labels=performance"),
        json!([
            issue_item(
                400,
                "Metal kernel for gather_qmm is slow",
                &["help wanted", "performance"],
                None,
                "open"
            ),
            issue_item(
                390,
                "Reduce allocations in the sampler",
                &["performance"],
                None,
                "open"
            ),
        ]),
    );
    f.insert(
        format!("/repos/{RELEASES}/releases"),
        json!([
            release("v0.31.0-rc1", "2026-11-25T18:00:00Z", true, true),
            release("v0.30.0", "2026-11-18T18:00:00Z", false, false),
            release("v0.29.4", "2026-10-30T18:00:00Z", false, false),
        ]),
    );
    f
}

struct Harness {
    fake: Shared,
    dir: tempfile::TempDir,
    config: Config,
    tz: Tz,
}

async fn harness() -> Harness {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let fake: Shared = Arc::new(Mutex::new(Fake {
        base: base.clone(),
        fixtures: fixtures(),
        remaining: 5000,
        ..Fake::default()
    }));
    let app = Router::new().fallback(answer).with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = Config {
        upstream: UPSTREAM.parse().unwrap(),
        upstream_branch: "main".into(),
        login: Login(LOGIN.into()),
        labels: vec![Label("help wanted".into()), Label("performance".into())],
        releases_repo: RELEASES.parse().unwrap(),
        report_dir: dir.path().join("reports"),
        fork: None,
        token: Some(TokenSource::File(token_path)),
        github: GitHubConfig {
            api_base: Some(base),
            max_attempts: 3,
            backoff_ms: 10,
            max_rate_limit_wait_s: 5,
            max_pages: 5,
            timeout_s: 10,
        },
        schedule: ScheduleConfig::default(),
    };
    Harness {
        fake,
        dir,
        config,
        tz: "Europe/Berlin".parse().unwrap(),
    }
}

impl Harness {
    async fn scan_at(&self, now: DateTime<Utc>) -> (Report, String) {
        let out = scan(&self.config, now, self.tz).await.unwrap();
        let md = std::fs::read_to_string(&out.markdown).unwrap();
        let json = std::fs::read_to_string(&out.json).unwrap();
        for text in [&md, &json] {
            assert!(!text.contains(TOKEN), "the token must never reach a report");
        }
        let reread: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(reread, out.report, "the JSON on disk is the report");
        (out.report, md)
    }

    fn take_log(&self) -> Vec<Logged> {
        std::mem::take(&mut self.fake.lock().unwrap().log)
    }

    fn script(&self, key: &str, responses: Vec<Scripted>) {
        self.fake
            .lock()
            .unwrap()
            .scripted
            .insert(key.to_owned(), responses.into());
    }
}

fn day(n: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T08:07:00Z")
        .unwrap()
        .with_timezone(&Utc)
        + chrono::Duration::days(n)
}

fn changes_section(md: &str) -> &str {
    let start = md
        .find("## Changed since last report")
        .expect("changes section");
    let rest = &md[start..];
    let end = rest[3..].find("\n## ").map(|i| i + 3).unwrap_or(rest.len());
    &rest[..end]
}

const COLD_CALLS: u64 = 9; // search 1, open PR 4, help wanted 2 pages, performance 1, releases 1

#[tokio::test]
async fn cold_scan_then_unchanged_warm_scan_is_all_conditional() {
    let h = harness().await;
    let (cold, md) = h.scan_at(day(0)).await;
    let log = h.take_log();
    println!(
        "cold scan: {} requests, {} conditional, {} not modified, {} charged",
        cold.api.requests,
        cold.api.conditional,
        cold.api.not_modified,
        cold.api.charged()
    );
    assert_eq!(cold.api.requests, COLD_CALLS);
    assert_eq!(log.len() as u64, COLD_CALLS);
    assert_eq!((cold.api.conditional, cold.api.not_modified), (0, 0));
    assert_eq!(cold.api.charged(), COLD_CALLS);
    assert!(log
        .iter()
        .all(|l| l.authorization.as_deref() == Some(&format!("Bearer {TOKEN}")[..])));
    assert!(cold.gaps.is_empty(), "{:?}", cold.gaps);
    assert!(cold.previous.is_none() && cold.changes.is_empty());
    assert!(md.contains("First report"));

    let prs = cold.pull_requests.as_ref().unwrap();
    assert_eq!(prs.iter().map(|p| p.number).collect::<Vec<_>>(), [301, 250]);
    let open = &prs[0];
    assert_eq!(open.state, PrState::Open);
    assert!(!open.draft);
    assert_eq!(open.review, Some(ReviewDecision::ChangesRequested));
    let checks = open.checks.as_ref().unwrap();
    assert_eq!(checks.state, ChecksState::Failing);
    assert_eq!((checks.passed, checks.failed, checks.pending), (2, 1, 0));
    assert_eq!(checks.failing, ["clippy"]);
    assert_eq!(open.mergeable_state.as_deref(), Some("blocked"));
    assert_eq!(prs[1].state, PrState::Merged);

    let issues: Vec<u64> = cold.issues.items.iter().map(|i| i.number).collect();
    assert_eq!(
        issues,
        [400, 395, 390],
        "pull requests left out, page 2 followed"
    );
    assert_eq!(cold.issues.items[0].labels.len(), 2);
    assert!(cold.issues.items.iter().all(|i| !i.new));

    let releases = cold.releases.as_ref().unwrap();
    let tags: Vec<&str> = releases.new.iter().map(|r| r.tag.as_str()).collect();
    assert_eq!(tags, ["v0.30.0", "v0.29.4"], "drafts are not releases");
    assert!(md.contains("| [#301](https://github.com/oxiglade/mlx-rs/pull/301) | open | changes requested | failing (2/1/0): clippy | blocked |"), "{md}");

    // Next day, nothing changed upstream.
    let (warm, md) = h.scan_at(day(1)).await;
    let log = h.take_log();
    println!(
        "warm scan: {} requests, {} conditional, {} not modified, {} charged",
        warm.api.requests,
        warm.api.conditional,
        warm.api.not_modified,
        warm.api.charged()
    );
    assert_eq!(warm.api.requests, COLD_CALLS);
    assert_eq!(warm.api.conditional, COLD_CALLS);
    assert_eq!(warm.api.not_modified, COLD_CALLS);
    assert_eq!(warm.api.charged(), 0);
    assert!(
        log.iter()
            .all(|l| l.if_none_match.is_some() && l.status == 304),
        "{log:?}"
    );
    assert!(warm.changes.is_empty(), "{:?}", warm.changes);
    assert_eq!(warm.previous, Some(day(0)));
    let changed = changes_section(&md);
    assert!(
        changed.contains("Nothing changed.") && !changed.contains("\n- "),
        "{changed}"
    );
    assert_eq!(warm.pull_requests, cold.pull_requests);
    assert_eq!(warm.issues, cold.issues);
    assert!(warm.releases.as_ref().unwrap().new.is_empty());
    assert!(md.contains("No new release. Latest: [v0.30.0]"));

    // One report per local day.
    let dates = report::dates(&h.config.report_dir);
    assert_eq!(dates.len(), 2);
    assert!(h.config.report_dir.join("upstream-2026-11-24.md").exists());
    assert!(h
        .config
        .report_dir
        .join("upstream-2026-11-25.json")
        .exists());
    assert_eq!(report::latest(&h.config.report_dir).unwrap(), warm);
    drop(h.dir);
}

#[tokio::test]
async fn changes_upstream_appear_at_the_top() {
    let h = harness().await;
    h.scan_at(day(0)).await;
    h.take_log();
    {
        let mut fake = h.fake.lock().unwrap();
        let f = &mut fake.fixtures;
        let perf = format!("/repos/{UPSTREAM}/issues?labels=performance");
        f.insert(
            perf,
            json!([
                issue_item(
                    405,
                    "Prefill is 2x slower than mlx-lm",
                    &["performance"],
                    None,
                    "open"
                ),
                issue_item(
                    400,
                    "Metal kernel for gather_qmm is slow",
                    &["help wanted", "performance"],
                    None,
                    "open"
                ),
            ]),
        );
        let rel = format!("/repos/{RELEASES}/releases");
        let mut list = f[&rel].as_array().unwrap().clone();
        list.insert(0, release("v0.30.1", "2026-11-24T20:00:00Z", false, false));
        f.insert(rel, Value::Array(list));
        let reviews = format!("/repos/{UPSTREAM}/pulls/301/reviews");
        let mut list = f[&reviews].as_array().unwrap().clone();
        list.push(review(
            90,
            "maintainer2",
            "APPROVED",
            "2026-11-24T21:00:00Z",
        ));
        f.insert(reviews, Value::Array(list));
    }
    let (r, md) = h.scan_at(day(1)).await;
    assert!(r.gaps.is_empty());
    // performance, releases, reviews changed; everything else answered 304.
    assert_eq!(r.api.requests, COLD_CALLS);
    assert_eq!(r.api.not_modified, COLD_CALLS - 3);
    let has = |c: &Change| r.changes.contains(c);
    assert!(has(&Change::IssueNew {
        number: 405,
        title: "Prefill is 2x slower than mlx-lm".into(),
        labels: vec![Label("performance".into())]
    }));
    assert!(has(&Change::IssueGone {
        number: 390,
        title: "Reduce allocations in the sampler".into()
    }));
    assert!(has(&Change::ReleaseNew {
        tag: "v0.30.1".into(),
        prerelease: false
    }));
    assert!(has(&Change::PrReview {
        number: 301,
        from: ReviewDecision::ChangesRequested,
        to: ReviewDecision::Approved
    }));
    assert_eq!(r.changes.len(), 4, "{:?}", r.changes);
    assert!(r.issues.items.iter().find(|i| i.number == 405).unwrap().new);
    let changed = changes_section(&md);
    assert!(
        changed.contains("issue #405 new [performance]"),
        "{changed}"
    );
    assert!(changed.contains("release v0.30.1"));
    assert!(changed.contains("PR #301 review: changes requested → approved"));
    assert!(md.find("## Changed since").unwrap() < md.find("## Fork").unwrap());
    assert!(md.contains("[#405](https://github.com/oxiglade/mlx-rs/issues/405) **new**"));
}

fn rate_limited(reset_in_s: i64, retry_after: Option<u64>) -> Scripted {
    let mut headers = vec![
        ("x-ratelimit-remaining", "0".to_owned()),
        (
            "x-ratelimit-reset",
            (Utc::now().timestamp() + reset_in_s).to_string(),
        ),
        ("x-ratelimit-resource", "core".to_owned()),
    ];
    if let Some(s) = retry_after {
        headers.push(("retry-after", s.to_string()));
    }
    Scripted {
        status: StatusCode::FORBIDDEN,
        headers,
        body: json!({
            "message": "API rate limit exceeded for user ID 7.",
            "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"
        }),
    }
}

#[tokio::test]
async fn short_rate_limit_is_waited_out() {
    let h = harness().await;
    // A secondary rate limit: 429 with retry-after.
    let mut limited = rate_limited(1, Some(1));
    limited.status = StatusCode::TOO_MANY_REQUESTS;
    h.script("/search/issues", vec![limited]);
    let started = std::time::Instant::now();
    let (r, _) = h.scan_at(day(0)).await;
    assert!(r.gaps.is_empty(), "{:?}", r.gaps);
    assert_eq!(r.api.requests, COLD_CALLS + 1);
    assert_eq!(r.api.retries, 1);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "waited for retry-after"
    );
    assert!(r.pull_requests.is_some());
}

#[tokio::test]
async fn exhausted_rate_limit_gives_a_precise_partial_report() {
    let h = harness().await;
    let (first, _) = h.scan_at(day(0)).await;
    assert!(first.gaps.is_empty());
    h.take_log();
    let key = format!("/repos/{UPSTREAM}/issues?labels=help wanted");
    h.script(&key, vec![rate_limited(3600, None)]);

    let (r, md) = h.scan_at(day(1)).await;
    let log = h.take_log();
    // Search + PR details + the rate-limited listing; nothing after it was sent.
    assert_eq!(log.len(), 6, "{log:?}");
    assert_eq!(log.last().unwrap().status, 403);
    assert_eq!(r.api.requests, 6);
    let whats: Vec<&str> = r.gaps.iter().map(|g| g.what.as_str()).collect();
    assert_eq!(
        whats,
        [
            "open issues labelled `help wanted`",
            "open issues labelled `performance`",
            "releases of ml-explore/mlx"
        ]
    );
    assert!(
        r.gaps[0].why.starts_with("rate limited (HTTP 403) until "),
        "{}",
        r.gaps[0].why
    );
    assert!(r.gaps[1]
        .why
        .starts_with("not requested: the rate limit is exhausted until"));
    assert!(r.is_partial());
    assert!(md.contains("## Could not get"));
    assert!(md.contains("- open issues labelled `help wanted`: rate limited (HTTP 403) until"));
    // Missing data is not a change: no issue "closed", no release vanished.
    assert!(r.changes.is_empty(), "{:?}", r.changes);
    assert!(r.releases.is_none() && r.issues.items.is_empty());
    assert!(md.contains(
        "Incomplete: the listing for `help wanted`, `performance` could not be read whole"
    ));
    assert!(!md.contains("None open."));
}

#[tokio::test]
async fn server_errors_are_retried_with_a_bound() {
    let h = harness().await;
    let bad_gateway = || Scripted {
        status: StatusCode::BAD_GATEWAY,
        headers: vec![],
        body: json!({"message": "Server Error"}),
    };
    h.script(
        &format!("/repos/{UPSTREAM}/commits/{HEAD_SHA}/check-runs"),
        vec![bad_gateway()],
    );
    h.script(
        &format!("/repos/{RELEASES}/releases"),
        vec![bad_gateway(), bad_gateway(), bad_gateway()],
    );
    let (r, md) = h.scan_at(day(0)).await;
    let log = h.take_log();
    // One transient 502 recovered; the releases gave up after three attempts.
    assert_eq!(
        r.pull_requests.as_ref().unwrap()[0]
            .checks
            .as_ref()
            .unwrap()
            .state,
        ChecksState::Failing
    );
    let release_calls = log.iter().filter(|l| l.key.ends_with("/releases")).count();
    assert_eq!(release_calls, 3);
    assert_eq!(r.api.requests, COLD_CALLS + 1 + 2);
    assert_eq!(r.api.retries, 3);
    assert_eq!(r.gaps.len(), 1);
    assert_eq!(r.gaps[0].what, "releases of ml-explore/mlx");
    assert_eq!(r.gaps[0].why, "HTTP 502 after 3 attempts");
    assert!(md.contains("## Releases of ml-explore/mlx\n\nUnknown: see \"Could not get\"."));

    // The error was not cached: the next scan asks for the releases unconditionally.
    let (r2, _) = h.scan_at(day(1)).await;
    let log = h.take_log();
    let rel = log.iter().find(|l| l.key.ends_with("/releases")).unwrap();
    assert!(rel.if_none_match.is_none() && rel.status == 200);
    assert!(r2.gaps.is_empty());
    // Known releases the first report never saw count as new, once.
    assert_eq!(r2.releases.as_ref().unwrap().new.len(), 2);
}

#[tokio::test]
async fn a_missing_fork_clone_is_a_gap_not_a_failure() {
    let mut h = harness().await;
    h.config.fork = Some(ForkConfig {
        repo: "octo-dev/mlx-rs".parse().unwrap(),
        clone: h.dir.path().join("no-clone-here"),
        remote: "origin".into(),
        branch: "main".into(),
        upstream_url: None,
        push: false,
    });
    let (r, md) = h.scan_at(day(0)).await;
    assert!(r.fork.is_none());
    assert_eq!(r.gaps.len(), 1);
    assert!(r.gaps[0].what.starts_with("fork sync of "), "{:?}", r.gaps);
    assert!(r.gaps[0].why.contains("no-clone-here"));
    assert!(r.pull_requests.is_some() && r.releases.is_some());
    assert!(md.contains("**Partial report"));
}

#[tokio::test]
async fn a_group_readable_token_file_stops_the_scan() {
    let h = harness().await;
    let Some(TokenSource::File(path)) = &h.config.token else {
        unreachable!()
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = scan(&h.config, day(0), h.tz).await.unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");
    assert!(
        h.take_log().is_empty(),
        "nothing sent without a usable token"
    );
}

#[tokio::test]
async fn page_limit_is_reported_and_stale_cache_entries_are_pruned() {
    let mut h = harness().await;
    let etags = h.config.report_dir.join(".state/etags.json");
    let entries = || -> usize {
        let v: Value = serde_json::from_slice(&std::fs::read(&etags).unwrap()).unwrap();
        v["entries"].as_object().unwrap().len()
    };
    h.scan_at(day(0)).await;
    assert_eq!(entries(), COLD_CALLS as usize);

    // PR 301 is merged: its details, reviews and checks are no longer asked for.
    {
        let mut fake = h.fake.lock().unwrap();
        let search = fake.fixtures.get_mut("/search/issues").unwrap();
        search["items"][0] = issue_item(
            301,
            "Fix fused attention on CPU backend",
            &[],
            Some(Some("2026-11-24T12:00:00Z")),
            "closed",
        );
    }
    let (r, _) = h.scan_at(day(1)).await;
    assert!(r.gaps.is_empty());
    assert!(r.changes.contains(&Change::PrState {
        number: 301,
        from: PrState::Open,
        to: PrState::Merged
    }));
    assert_eq!(
        entries(),
        COLD_CALLS as usize - 4,
        "the closed PR's entries are gone"
    );

    // Only one page per listing: the help-wanted listing is cut short, and says so.
    h.config.github.max_pages = 1;
    let (r, _) = h.scan_at(day(2)).await;
    assert_eq!(r.gaps.len(), 1, "{:?}", r.gaps);
    assert_eq!(r.gaps[0].what, "some open issues labelled `help wanted`");
    assert!(r.gaps[0].why.contains("only the first 1"));
    assert!(!r
        .issues
        .complete_labels
        .contains(&Label("help wanted".into())));
    // Issue 395 (on page 2) is not called gone: its label was not read whole.
    assert!(r.changes.is_empty(), "{:?}", r.changes);
}

/// Upstream and fork as bare repositories with the fork's clone one commit behind.
fn fork_world(root: &std::path::Path) -> ForkConfig {
    use git2::{Repository, RepositoryInitOptions, Signature};
    let init = |p: &std::path::Path, bare: bool| {
        let mut o = RepositoryInitOptions::new();
        o.bare(bare).initial_head("main");
        Repository::init_opts(p, &o).unwrap()
    };
    let upstream = root.join("upstream.git");
    let fork = root.join("fork.git");
    init(&upstream, true);
    init(&fork, true);
    let dev = init(&root.join("dev"), false);
    let commit = |msg: &str| {
        std::fs::write(dev.workdir().unwrap().join("f.txt"), msg).unwrap();
        let mut index = dev.index().unwrap();
        index.add_path(std::path::Path::new("f.txt")).unwrap();
        let tree = dev.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = Signature::now("T", "t@example.invalid").unwrap();
        let parent = dev.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        dev.commit(Some("HEAD"), &sig, &sig, msg, &tree, &parents)
            .unwrap();
    };
    let push = |to: &std::path::Path| {
        dev.remote_anonymous(to.to_str().unwrap())
            .unwrap()
            .push(&["refs/heads/main:refs/heads/main"], None)
            .unwrap();
    };
    commit("one");
    push(&upstream);
    push(&fork);
    Repository::clone(fork.to_str().unwrap(), root.join("clone")).unwrap();
    commit("two");
    push(&upstream);
    ForkConfig {
        repo: "octo-dev/mlx-rs".parse().unwrap(),
        clone: root.join("clone"),
        remote: "origin".into(),
        branch: "main".into(),
        upstream_url: Some(upstream.to_str().unwrap().to_owned()),
        push: true,
    }
}

#[tokio::test]
async fn full_scan_with_fork_then_an_unchanged_one() {
    let mut h = harness().await;
    h.config.fork = Some(fork_world(h.dir.path()));
    let (first, md) = h.scan_at(day(0)).await;
    assert!(first.gaps.is_empty(), "{:?}", first.gaps);
    assert!(
        matches!(
            first.changes[..],
            [
                Change::ForkFastForwarded { commits: 1, .. },
                Change::ForkPushed { commits: 1 }
            ]
        ),
        "{:?}",
        first.changes
    );
    assert!(md.contains("fork: local branch fast-forwarded by 1 commit(s)"));
    assert!(md.contains("- fork on GitHub: 0 ahead / 0 behind upstream"));

    let (second, md) = h.scan_at(day(1)).await;
    assert!(second.changes.is_empty(), "{:?}", second.changes);
    assert!(changes_section(&md).contains("Nothing changed."));
    assert_eq!(second.api.charged(), 0);
}
