//! Chat templates render to exactly the text Python's Jinja2 renders, configured as the
//! Hugging Face tokenizer configures it (`tools/reference/tokenizer_chat_template.py` in `.venv`).

use std::path::{Path, PathBuf};
use std::process::Command;

use cathedral_runtime::prompt::{
    expand_image_pads, template_messages_json, ChatMessage, ChatTemplate, ContentPart, PromptError,
    Role,
};
use cathedral_runtime::tokenizer::CHAT_TEMPLATE;
use cathedral_runtime::vision::preprocess::DecodedImage;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Exercises what checkpoint templates use: namespaces, loop variables and controls, Python
/// string methods, filters, slicing, `tojson`, whitespace control.
const RICH_TEMPLATE: &str = r#"{%- set ns = namespace(system='', images=0, last_user=-1) %}
{%- for m in messages %}
  {%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- if messages and messages[0].role == 'system' and messages[0].content is string %}
  {%- set ns.system = messages[0].content %}
{%- endif %}
{%- if ns.system %}
<<SYS>>{{ ns.system | trim }}<</SYS>>
{% endif %}
{%- for m in messages %}
  {%- if loop.first and m.role == 'system' %}{% continue %}{% endif %}
  {%- if m.content is string %}
    {%- set text = m.content %}
  {%- else %}
    {%- set parts = namespace(text='') %}
    {%- for p in m.content %}
      {%- if p.type == 'image' %}
        {%- set ns.images = ns.images + 1 %}
        {%- set parts.text = parts.text ~ '[img ' ~ ns.images ~ ']' %}
      {%- else %}
        {%- set parts.text = parts.text ~ p['text'] %}
      {%- endif %}
    {%- endfor %}
    {%- set text = parts.text %}
  {%- endif %}
[{{ loop.index }}/{{ loop.length }}] {{ m.role | upper }}{% if loop.index0 == ns.last_user %} (last){% endif %}:
{% if text.startswith('/') %}command {{ text[1:].split(' ')[0] }}{% else %}{{ text.strip() | replace('\n\n', '\n') }}{% endif %}

  {%- if m.role == 'assistant' and '</think>' in text %}
    {{- ' | answer=' ~ text.split('</think>')[-1].lstrip('\n') }}
  {%- endif %}
  {%- if loop.index > 6 %}{% break %}{% endif %}
{% endfor %}
{%- if add_generation_prompt %}
ASSISTANT{{ ' after ' ~ (messages | length) ~ ' messages' }}:
{%- endif %}
JSON {{ messages | tojson }}
{{ messages[-1:] | tojson(indent=2) }}
"#;

/// Refuses a system message anywhere but first, through `raise_exception`.
const STRICT_TEMPLATE: &str = r#"{%- for m in messages %}
{%- if m.role == 'system' and not loop.first %}
{{- raise_exception('System message must be at the beginning.') }}
{%- endif %}
{{- '<|im_start|>' + m.role + '\n' + (m.content if m.content is string else m.content | map(attribute='type') | join(',')) + '<|im_end|>\n' }}
{%- endfor %}
"#;

/// Prints values the way Python does (`True`, `None`, list and dict reprs).
const PRINT_TEMPLATE: &str = r#"{{ add_generation_prompt }} {{ tools }} {{ messages | length > 1 }}
{{ messages[0] }}
{{ messages | map(attribute='role') | list }} {{ [1, 'a"b', "it's", none, true, 2.5, "tab\there"] }}
"#;

fn image() -> ContentPart {
    ContentPart::Image(DecodedImage::from_rgb(image::RgbImage::new(3, 2)))
}

fn text(t: &str) -> ContentPart {
    ContentPart::Text(t.to_string())
}

fn conversations() -> Vec<Vec<ChatMessage>> {
    use Role::*;
    let msg = |role, content| ChatMessage { role, content };
    vec![
        vec![ChatMessage::text(User, "Hello!")],
        vec![
            ChatMessage::text(System, "  You are terse.\n"),
            ChatMessage::text(User, "What is 2+2?"),
            ChatMessage::text(Assistant, "<think>\nadd\n</think>\n\n4"),
            ChatMessage::text(User, "And 3+3?\n\nThanks."),
        ],
        vec![msg(
            User,
            vec![
                text("Compare "),
                image(),
                text(" and "),
                image(),
                text(". Which is brighter?"),
            ],
        )],
        vec![
            ChatMessage::text(User, "Weather?"),
            ChatMessage::text(Assistant, "<tool_call>{\"name\": \"w\"}</tool_call>"),
            ChatMessage::text(Tool, "{\"temp\": 21.5, \"unit\": \"°C\"}"),
        ],
        vec![ChatMessage::text(
            User,
            "中文和日本語 🦀👩‍💻 {{ not a tag }} {% raw %} \"quotes\" 'single' \\ back\\slash\ttab",
        )],
        vec![msg(User, vec![]), ChatMessage::text(Assistant, "")],
        vec![ChatMessage::text(User, "/reset all the things")],
        vec![msg(User, vec![text("part one, "), text("part two")])],
        vec![
            ChatMessage::text(User, "first"),
            ChatMessage::text(System, "late system"),
        ],
        vec![msg(User, vec![image()])],
        (0..9)
            .map(|i| {
                ChatMessage::text(
                    if i % 2 == 0 { User } else { Assistant },
                    format!("turn {i}"),
                )
            })
            .collect(),
    ]
}

#[test]
fn templates_render_as_python_jinja2_renders_them() {
    let root = repo_root();
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `bash scripts/setup.sh` first",
        python.display()
    );
    let templates = [
        ("builtin", CHAT_TEMPLATE),
        ("rich", RICH_TEMPLATE),
        ("strict", STRICT_TEMPLATE),
        ("print", PRINT_TEMPLATE),
    ];
    let convs = conversations();
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for (name, source) in templates {
        let template = ChatTemplate::new(source).unwrap();
        for (i, conv) in convs.iter().enumerate() {
            for gen in [false, true] {
                cases.push(serde_json::json!({
                    "template": source,
                    "messages": template_messages_json(conv),
                    "add_generation_prompt": gen,
                }));
                ours.push((format!("{name} #{i} gen={gen}"), template.render(conv, gen)));
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("cases.json");
    let output = dir.path().join("rendered.json");
    std::fs::write(&input, serde_json::json!({ "cases": cases }).to_string()).unwrap();
    let status = Command::new(&python)
        .arg(root.join("tools/reference/tokenizer_chat_template.py"))
        .arg(&input)
        .arg(&output)
        .status()
        .expect("run the Jinja2 reference");
    assert!(status.success(), "Jinja2 reference failed: {status}");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    let results = reference["results"].as_array().unwrap();
    assert_eq!(results.len(), ours.len());

    let mut errors = 0;
    for ((label, got), want) in ours.iter().zip(results) {
        match (got, want.get("text").and_then(|t| t.as_str())) {
            (Ok(got), Some(want)) => assert_eq!(got, want, "{label}"),
            (Err(PromptError::Render(message)), None) => {
                let want = want["error"].as_str().unwrap();
                let reason = want.split_once(": ").map_or(want, |(_, r)| r);
                assert!(
                    message.contains(reason),
                    "{label}: error {message:?} vs {want:?}"
                );
                errors += 1;
            }
            (got, _) => panic!("{label}: ours {got:?}, Jinja2 {want}"),
        }
    }
    // Only the late system message under the strict template fails (twice: with and without
    // the generation prompt).
    assert_eq!(errors, 2);
}

#[test]
fn checkpoint_template_is_found_in_tokenizer_config_then_jinja_file() {
    let dir = tempfile::tempdir().unwrap();
    let conv = [ChatMessage::text(Role::User, "hi")];
    let builtin = ChatTemplate::from_checkpoint(dir.path()).unwrap();
    assert_eq!(builtin.source(), CHAT_TEMPLATE);

    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "F:{{ messages[0].content }}",
    )
    .unwrap();
    let from_file = ChatTemplate::from_checkpoint(dir.path()).unwrap();
    assert_eq!(from_file.render(&conv, false).unwrap(), "F:hi");

    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({ "chat_template": [
            { "name": "tool_use", "template": "T" },
            { "name": "default", "template": "D:{{ messages[0].role }}" },
        ]})
        .to_string(),
    )
    .unwrap();
    let named = ChatTemplate::from_checkpoint(dir.path()).unwrap();
    assert_eq!(named.render(&conv, false).unwrap(), "D:user");

    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({ "chat_template": "C:{% if add_generation_prompt %}gen{% endif %}" })
            .to_string(),
    )
    .unwrap();
    let config = ChatTemplate::from_checkpoint(dir.path()).unwrap();
    assert_eq!(config.render(&conv, true).unwrap(), "C:gen");
}

#[test]
fn image_pads_expand_after_rendering() {
    let conv = [ChatMessage {
        role: Role::User,
        content: vec![image(), text("and"), image()],
    }];
    let rendered = ChatTemplate::builtin().render(&conv, true).unwrap();
    let expanded = expand_image_pads(&rendered, &[4, 1]).unwrap();
    assert_eq!(
        expanded,
        "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|image_pad|>\
         <|vision_end|>and<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert!(expand_image_pads(&rendered, &[4]).is_err());
    assert!(
        ChatTemplate::new("{% for %}").is_err(),
        "a broken template is refused when loaded"
    );
}
