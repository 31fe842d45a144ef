fn main() {
    println!("omnicall");
}
