//! `kafka.topic_template`: `outbox.event.{aggregatetype}`-style topic names, parsed once (at
//! validation, so a bad template is a configuration error naming the key).

/// The topic template, parsed once.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicTemplate(Vec<Segment>);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Field {
    AggregateType,
    AggregateId,
    EventType,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    Field(Field),
}

impl TopicTemplate {
    /// Parses `outbox.event.{aggregatetype}`-style templates; the error says what to fix.
    pub fn parse(template: &str) -> Result<TopicTemplate, String> {
        let mut segments = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                segments.push(Segment::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in {template:?}"))?
                + open;
            let field = match &rest[open + 1..close] {
                "aggregatetype" => Field::AggregateType,
                "aggregateid" => Field::AggregateId,
                "type" => Field::EventType,
                other => {
                    return Err(format!(
                        "unknown placeholder {{{other}}}; use {{aggregatetype}}, {{aggregateid}} or {{type}}"
                    ));
                }
            };
            segments.push(Segment::Field(field));
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            segments.push(Segment::Literal(rest.to_owned()));
        }
        if segments.is_empty() {
            return Err("the topic template is empty".into());
        }
        Ok(TopicTemplate(segments))
    }

    /// The text every topic this template renders starts with (before its first placeholder).
    pub fn literal_prefix(&self) -> &str {
        match self.0.first() {
            Some(Segment::Literal(l)) => l,
            _ => "",
        }
    }

    /// The topic for a row with these values.
    pub fn render(&self, aggregatetype: &str, aggregateid: &str, event_type: &str) -> String {
        let mut out = String::with_capacity(32);
        for s in &self.0 {
            match s {
                Segment::Literal(l) => out.push_str(l),
                Segment::Field(Field::AggregateType) => out.push_str(aggregatetype),
                Segment::Field(Field::AggregateId) => out.push_str(aggregateid),
                Segment::Field(Field::EventType) => out.push_str(event_type),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        let t = TopicTemplate::parse("{aggregatetype}-{type}.v1").unwrap();
        assert_eq!(t.render("order", "1", "Created"), "order-Created.v1");
        assert_eq!(
            TopicTemplate::parse("fixed").unwrap().render("a", "b", "c"),
            "fixed"
        );
        assert!(
            TopicTemplate::parse("x.{bad}")
                .unwrap_err()
                .contains("{bad}")
        );
        assert!(TopicTemplate::parse("x.{aggregatetype").is_err());
        assert!(TopicTemplate::parse("").is_err());
    }
}
