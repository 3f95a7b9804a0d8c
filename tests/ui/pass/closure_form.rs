// Steps without the macro: closures, mixed with `#[step]` steps in both directions of
// dependency (a closure step depends on a macro step here).
use pgflow::prelude::*;

#[step]
async fn words(text: &String) -> Result<Vec<String>, StepError> {
    Ok(text.split_whitespace().map(str::to_owned).collect())
}

fn main() {
    let lengths = step_fn("lengths")
        .map_over(&words)
        .handler(|word: String, _ctx| async move { Ok(word.len()) });
    let longest = step_fn("longest")
        .depends_on(&words)
        .depends_on(&lengths)
        .timeout(5)
        .handler(
            |text: String, words: Vec<String>, lengths, _ctx| async move {
                let lengths: Vec<usize> = lengths;
                let max = lengths.iter().copied().max().unwrap_or(0);
                Ok(format!("{text}: {} words, longest {max}", words.len()))
            },
        );
    let root_map = step_fn("shout")
        .map_over_input()
        .handler(|word: String, _ctx| async move { Ok(word.to_uppercase()) });

    let flow: Flow<String> = Flow::new("text")
        .step(words)
        .step(lengths)
        .step(longest)
        .build();
    assert_eq!(flow.steps().len(), 3);
    let _: Flow<Vec<String>> = Flow::new("shouting").step(root_map).build();
}
