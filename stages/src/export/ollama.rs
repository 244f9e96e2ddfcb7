//! An Ollama `Modelfile` beside an exported GGUF file: `FROM ./<file>.gguf`, a `TEMPLATE` in
//! Ollama's Go-template language equivalent to the model's Jinja chat template, and
//! `PARAMETER stop` lines for its end-of-turn and eos tokens.
//!
//! Ollama does not run Jinja, so the template is recognised rather than translated: ChatML
//! (`<|im_start|>role\n…<|im_end|>`), Llama 3 (`<|start_header_id|>…<|eot_id|>`) and Alpaca
//! (`### Instruction:` / `### Response:`) become the equivalent loop over `.Messages`. Anything
//! else gets no `TEMPLATE` line (Ollama then falls back to the template it detects from the
//! file's `tokenizer.chat_template`) and a comment saying so.

/// The chat formats the Modelfile knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatFormat {
    ChatMl,
    Llama3,
    Alpaca,
}

impl ChatFormat {
    /// Recognise a Jinja chat template by the markers it writes.
    pub fn detect(jinja: &str) -> Option<Self> {
        if jinja.contains("<|im_start|>") && jinja.contains("<|im_end|>") {
            Some(ChatFormat::ChatMl)
        } else if jinja.contains("<|start_header_id|>") && jinja.contains("<|eot_id|>") {
            Some(ChatFormat::Llama3)
        } else if jinja.contains("### Instruction:") && jinja.contains("### Response:") {
            Some(ChatFormat::Alpaca)
        } else {
            None
        }
    }

    /// Ollama's Go template for this format (`eos` closes alpaca responses).
    pub fn go_template(self, eos: &str) -> String {
        match self {
            ChatFormat::ChatMl => "{{- range .Messages }}<|im_start|>{{ .Role }}\n\
                 {{ .Content }}<|im_end|>\n\
                 {{ end }}<|im_start|>assistant\n"
                .to_owned(),
            ChatFormat::Llama3 => {
                "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n\
                 {{ .Content }}<|eot_id|>\
                 {{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
                    .to_owned()
            }
            ChatFormat::Alpaca => format!(
                "{{{{- range .Messages }}}}\
                 {{{{- if eq .Role \"system\" }}}}{{{{ .Content }}}}\n\n\
                 {{{{- else if eq .Role \"user\" }}}}### Instruction:\n{{{{ .Content }}}}\n\n\
                 {{{{- else if eq .Role \"assistant\" }}}}### Response:\n{{{{ .Content }}}}{eos}\n\n\
                 {{{{- else }}}}### Input:\n{{{{ .Content }}}}\n\n\
                 {{{{- end }}}}\
                 {{{{- end }}}}### Response:\n"
            ),
        }
    }

    /// The tokens that end a turn in this format.
    pub fn stops(self) -> &'static [&'static str] {
        match self {
            ChatFormat::ChatMl => &["<|im_end|>", "<|im_start|>"],
            ChatFormat::Llama3 => &["<|eot_id|>", "<|start_header_id|>"],
            ChatFormat::Alpaca => &["### Instruction:"],
        }
    }
}

/// The Modelfile text for `gguf_file` (a file name beside it), with the model's chat template
/// (Jinja) and eos token.
pub fn modelfile(gguf_file: &str, chat_template: Option<&str>, eos: Option<&str>) -> String {
    let mut s = String::from(
        "# Ollama Modelfile written by burnish (export.gguf): ollama create NAME -f Modelfile\n",
    );
    s.push_str(&format!("FROM ./{gguf_file}\n"));
    let format = chat_template.and_then(ChatFormat::detect);
    match (format, chat_template) {
        (Some(f), _) => {
            s.push_str(&format!(
                "TEMPLATE \"\"\"{}\"\"\"\n",
                f.go_template(eos.unwrap_or(""))
            ));
        }
        (None, Some(_)) => s.push_str(
            "# The chat template is not one burnish can write as a Go template (ChatML, Llama 3, \
             Alpaca);\n# Ollama uses the GGUF file's tokenizer.chat_template when it recognises it.\n",
        ),
        (None, None) => s.push_str("# The model has no chat template.\n"),
    }
    let mut stops: Vec<&str> = format.map(|f| f.stops().to_vec()).unwrap_or_default();
    if let Some(e) = eos
        && !e.is_empty()
        && !stops.contains(&e)
    {
        stops.push(e);
    }
    for stop in stops {
        s.push_str(&format!("PARAMETER stop {}\n", go_quote(stop)));
    }
    s
}

/// A double-quoted Modelfile string.
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_template_becomes_a_messages_loop_with_stops() {
        let m = modelfile(
            "p-s-q8_0.gguf",
            Some(crate::text::template::CHATML),
            Some("<|im_end|>"),
        );
        assert!(m.contains("FROM ./p-s-q8_0.gguf\n"), "{m}");
        assert!(
            m.contains("TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n\"\"\""),
            "{m}"
        );
        assert_eq!(m.matches("PARAMETER stop").count(), 2, "{m}");
        assert!(m.contains("PARAMETER stop \"<|im_end|>\"\n"), "{m}");
    }

    #[test]
    fn alpaca_template_closes_responses_with_eos() {
        let t = ChatFormat::Alpaca.go_template("</s>");
        assert!(t.contains("### Response:\n{{ .Content }}</s>"), "{t}");
        assert!(t.ends_with("{{- end }}### Response:\n"), "{t}");
    }

    #[test]
    fn unknown_template_is_left_to_ollama() {
        let m = modelfile("x.gguf", Some("{{ messages }}"), Some("</s>"));
        assert!(!m.contains("TEMPLATE"), "{m}");
        assert!(m.contains("PARAMETER stop \"</s>\"\n"), "{m}");
    }
}
